/* AVX-512F logits row kernels: 16 float32 lanes, see logits_template.h; the exp of exp_poly.h
 * (11 operations per 16 values, 2^n by vscalefps, no clamp). */
#include "common.h"
#include "exp_poly.h"
#ifdef PD_X86
#include <immintrin.h>

#define PD_TARGET __attribute__((target("avx512f,avx2,fma,f16c")))
#define PD_FT float
typedef __m512 pd_f;
#define PD_FW 16
#define pd_f_set1(x) _mm512_set1_ps(x)
#define pd_f_zero() _mm512_setzero_ps()
#define pd_f_add(a, b) _mm512_add_ps(a, b)
#define pd_f_sub(a, b) _mm512_sub_ps(a, b)
#define pd_f_mul(a, b) _mm512_mul_ps(a, b)
#define pd_f_max(a, b) _mm512_max_ps(a, b)
#define pd_f_min(a, b) _mm512_min_ps(a, b)
#define pd_f_fma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define PD_EXP_NAN 1
/* NaN mask accumulated as 0/1 floats in a vector (AVX-512F has no ps logic ops) */
#define pd_f_nanmask_or(acc, x) _mm512_mask_mov_ps(acc, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_ps(1.0f))
#define pd_f_anynan(acc) (_mm512_cmp_ps_mask(acc, _mm512_setzero_ps(), _CMP_NEQ_OQ) != 0)
#define pd_f_gt_count(x, t) __builtin_popcount((unsigned)_mm512_cmp_ps_mask(x, t, _CMP_GT_OQ))
/* pd_f_and(a, pd_f_pos(e)): zero the lanes where e == 0 */
#define pd_f_pos(x) _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ)
#define pd_f_and(a, m) _mm512_maskz_mov_ps(m, a)

PD_TARGET static inline float pd_f_hmax(__m512 v) { return _mm512_reduce_max_ps(v); }
PD_TARGET static inline double pd_f_hsum(__m512 v)
{
    __m512d d = _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)),
                              _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
    return _mm512_reduce_add_pd(d);
}
/* e^x = 2^n p(r) (exp_poly.h) without a clamp: vscalefps makes 2^n subnormal or 0 for n < -126;
 * below x = -2.9e6 (n past the shift's 2^22) p is garbage, so p 2^n is 0 or not finite; NaN,
 * -inf and x < -2.3e38 (x log2 e overflows) give NaN.  A non-finite sum sends the template to
 * pd_f_exp0 (clamped, exactly 0 below PD_EXP_MIN). */
PD_TARGET static inline __m512 pd_f_exp(__m512 x)
{
    __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(PD_EXP_LOG2E), _mm512_set1_ps(PD_EXP_SHIFT));
    __m512 n = _mm512_sub_ps(t, _mm512_set1_ps(PD_EXP_SHIFT)), p;
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(PD_EXP_LN2), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(PD_EXP_LN2_TAIL), r);
    p = _mm512_fmadd_ps(_mm512_set1_ps(PD_EXP_C6), r, _mm512_set1_ps(PD_EXP_C5));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(PD_EXP_C4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(PD_EXP_C3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(PD_EXP_C2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
PD_TARGET static inline __m512 pd_f_exp0(__m512 x)
{
    __m512 c = _mm512_set1_ps(PD_EXP_MIN);
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, c, _CMP_GE_OQ), pd_f_exp(_mm512_max_ps(c, x)));
}
#define pd_f_exp0 pd_f_exp0
PD_TARGET static inline __m512 ld_f32(const char *p) { return _mm512_loadu_ps((const float *)p); }
PD_TARGET static inline __m512 ld_f16(const char *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
PD_TARGET static inline __m512 ld_bf16(const char *p)
{
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

#include "logits_template.h"
PD_DEFINE_LOGITS(lg_f32, ld_f32, pd_load_f32, 4)
PD_DEFINE_LOGITS(lg_f16, ld_f16, pd_load_f16, 2)
PD_DEFINE_LOGITS(lg_bf16, ld_bf16, pd_load_bf16, 2)

const pd_logits_kernels pd_logits_avx512 = {
    {{NULL, NULL, NULL}, PD_LOGITS_TABLE_ENTRY(lg_f32), PD_LOGITS_TABLE_ENTRY(lg_f16),
     PD_LOGITS_TABLE_ENTRY(lg_bf16)}};
#endif
