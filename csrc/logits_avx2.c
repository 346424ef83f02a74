/* AVX2 + FMA (+F16C) logits row kernels: 8 float32 lanes, see logits_template.h; the exp of
 * exp_poly.h (13 operations per 8 values, 2^n through the exponent bits, so clamped). */
#include "common.h"
#include "exp_poly.h"
#ifdef PD_X86
#include <immintrin.h>

#define PD_TARGET __attribute__((target("avx2,fma,f16c")))
#define PD_FT float
typedef __m256 pd_f;
#define PD_FW 8
#define pd_f_set1(x) _mm256_set1_ps(x)
#define pd_f_zero() _mm256_setzero_ps()
#define pd_f_add(a, b) _mm256_add_ps(a, b)
#define pd_f_sub(a, b) _mm256_sub_ps(a, b)
#define pd_f_mul(a, b) _mm256_mul_ps(a, b)
#define pd_f_max(a, b) _mm256_max_ps(a, b)
#define pd_f_min(a, b) _mm256_min_ps(a, b)
#define pd_f_fma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define PD_EXP_NAN 1
#define pd_f_nanmask_or(acc, x) _mm256_or_ps(acc, _mm256_cmp_ps(x, x, _CMP_UNORD_Q))
#define pd_f_anynan(acc) (_mm256_movemask_ps(acc) != 0)
#define pd_f_gt_count(x, t) __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(x, t, _CMP_GT_OQ)))
#define pd_f_pos(x) _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ)
#define pd_f_and(a, m) _mm256_and_ps(a, m)

PD_TARGET static inline float pd_f_hmax(__m256 v)
{
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}
PD_TARGET static inline double pd_f_hsum(__m256 v)
{
    __m256d d = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                              _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(d), _mm256_extractf128_pd(d, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
PD_TARGET static inline __m256 pd_f_exp(__m256 x)
{
    __m256 t, n, r, p;
    x = _mm256_max_ps(_mm256_set1_ps(PD_EXP_MIN), x); /* NaN stays NaN */
    t = _mm256_fmadd_ps(x, _mm256_set1_ps(PD_EXP_LOG2E), _mm256_set1_ps(PD_EXP_SHIFT));
    n = _mm256_sub_ps(t, _mm256_set1_ps(PD_EXP_SHIFT));
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(PD_EXP_LN2), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(PD_EXP_LN2_TAIL), r);
    p = _mm256_fmadd_ps(_mm256_set1_ps(PD_EXP_C6), r, _mm256_set1_ps(PD_EXP_C5));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(PD_EXP_C4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(PD_EXP_C3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(PD_EXP_C2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    /* 2^n: the low bits of t are n + 127 (n >= -126), shifted into the exponent field */
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23)));
}
/* exactly 0 below PD_EXP_MIN (pd_f_exp gives 1.2e-38 there) */
#define pd_f_exp0(x) _mm256_and_ps(pd_f_exp(x), _mm256_cmp_ps(x, _mm256_set1_ps(PD_EXP_MIN), _CMP_GE_OQ))
PD_TARGET static inline __m256 ld_f32(const char *p) { return _mm256_loadu_ps((const float *)p); }
PD_TARGET static inline __m256 ld_f16(const char *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
PD_TARGET static inline __m256 ld_bf16(const char *p)
{
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

#include "logits_template.h"
PD_DEFINE_LOGITS(lg_f32, ld_f32, pd_load_f32, 4)
PD_DEFINE_LOGITS(lg_f16, ld_f16, pd_load_f16, 2)
PD_DEFINE_LOGITS(lg_bf16, ld_bf16, pd_load_bf16, 2)

const pd_logits_kernels pd_logits_avx2 = {
    {{NULL, NULL, NULL}, PD_LOGITS_TABLE_ENTRY(lg_f32), PD_LOGITS_TABLE_ENTRY(lg_f16),
     PD_LOGITS_TABLE_ENTRY(lg_bf16)}};
#endif
