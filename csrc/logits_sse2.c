/* SSE2 logits row kernels for float32 (the x86-64 baseline): 4 lanes, no FMA or roundps, so
 * the exp of exp_poly.h with separate multiply/add and round-to-nearest via cvtps2dq. */
#include "common.h"
#include "exp_poly.h"
#ifdef PD_X86
#include <emmintrin.h>

#define PD_TARGET __attribute__((target("sse2")))
#define PD_FT float
typedef __m128 pd_f;
#define PD_FW 4
#define pd_f_set1(x) _mm_set1_ps(x)
#define pd_f_zero() _mm_setzero_ps()
#define pd_f_add(a, b) _mm_add_ps(a, b)
#define pd_f_sub(a, b) _mm_sub_ps(a, b)
#define pd_f_mul(a, b) _mm_mul_ps(a, b)
#define pd_f_max(a, b) _mm_max_ps(a, b)
#define pd_f_nanmask_or(acc, x) _mm_or_ps(acc, _mm_cmpunord_ps(x, x))
#define pd_f_anynan(acc) (_mm_movemask_ps(acc) != 0)
#define pd_f_gt_count(x, t) __builtin_popcount((unsigned)_mm_movemask_ps(_mm_cmpgt_ps(x, t)))
#define pd_f_pos(x) _mm_cmpgt_ps(x, _mm_setzero_ps())
#define pd_f_and(a, m) _mm_and_ps(a, m)

PD_TARGET static inline float pd_f_hmax(__m128 m)
{
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}
PD_TARGET static inline double pd_f_hsum(__m128 v)
{
    __m128d s = _mm_add_pd(_mm_cvtps_pd(v), _mm_cvtps_pd(_mm_movehl_ps(v, v)));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
PD_TARGET static inline __m128 pd_f_exp(__m128 x)
{
    __m128 r, p, keep = _mm_cmpge_ps(x, _mm_set1_ps(PD_EXP_MIN));
    __m128i ni;
    x = _mm_max_ps(x, _mm_set1_ps(PD_EXP_MIN));
    ni = _mm_cvtps_epi32(_mm_mul_ps(x, _mm_set1_ps(PD_EXP_LOG2E)));
    {
        __m128 n = _mm_cvtepi32_ps(ni);
        r = _mm_sub_ps(x, _mm_mul_ps(n, _mm_set1_ps(PD_EXP_LN2_HI)));
        r = _mm_sub_ps(r, _mm_mul_ps(n, _mm_set1_ps(PD_EXP_LN2_LO)));
    }
    p = _mm_set1_ps(PD_EXP_P5);
    p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(PD_EXP_P4));
    p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(PD_EXP_P3));
    p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(PD_EXP_P2));
    p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(PD_EXP_P1));
    p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(PD_EXP_P0));
    p = _mm_add_ps(_mm_mul_ps(p, _mm_mul_ps(r, r)), _mm_add_ps(r, _mm_set1_ps(1.0f)));
    p = _mm_mul_ps(p, _mm_castsi128_ps(_mm_slli_epi32(_mm_add_epi32(ni, _mm_set1_epi32(127)), 23)));
    return _mm_and_ps(p, keep); /* exp(-inf) = 0 */
}
PD_TARGET static inline __m128 ld_f32(const char *p) { return _mm_loadu_ps((const float *)p); }

#include "logits_template.h"
PD_DEFINE_LOGITS(lg_f32, ld_f32, pd_load_f32, 4)

const pd_logits_kernels pd_logits_sse2 = {
    {{NULL, NULL, NULL}, PD_LOGITS_TABLE_ENTRY(lg_f32), {NULL, NULL, NULL}, {NULL, NULL, NULL}}};
#endif
