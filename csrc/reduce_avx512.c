/* AVX-512F reduction kernels: 8 float64 lanes, see reduce_template.h. */
#include "common.h"
#ifdef PD_X86
#include <immintrin.h>

#define PD_TARGET __attribute__((target("avx512f,avx2,f16c")))
typedef __m512d pd_v;
#define PD_W 8
#define pd_v_zero() _mm512_setzero_pd()
#define pd_v_set1(x) _mm512_set1_pd(x)
#define pd_v_add(a, b) _mm512_add_pd(a, b)
#define pd_v_max(a, b) _mm512_max_pd(a, b)
#define pd_v_sub(a, b) _mm512_sub_pd(a, b)
#define pd_v_store(d, v) _mm512_storeu_pd(d, v)
#define pd_v_abs(v) _mm512_abs_pd(v)

PD_TARGET static inline double pd_v_hsum(__m512d v)
{
    __m256d s = _mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
    __m128d t = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    return _mm_cvtsd_f64(_mm_add_sd(t, _mm_unpackhi_pd(t, t)));
}
PD_TARGET static inline double pd_v_hmax(__m512d v)
{
    __m256d s = _mm256_max_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
    __m128d t = _mm_max_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    return _mm_cvtsd_f64(_mm_max_sd(t, _mm_unpackhi_pd(t, t)));
}
PD_TARGET static inline __m512d ld_f64(const char *p) { return _mm512_loadu_pd((const double *)p); }
PD_TARGET static inline __m512d ld_f32(const char *p) { return _mm512_cvtps_pd(_mm256_loadu_ps((const float *)p)); }
PD_TARGET static inline __m512d ld_f16(const char *p)
{
    return _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)));
}

#include "reduce_template.h"
PD_DEFINE_REDUCE(reduce_f64, ld_f64, pd_load_f64, 8)
PD_DEFINE_REDUCE(reduce_f32, ld_f32, pd_load_f32, 4)
PD_DEFINE_REDUCE(reduce_f16, ld_f16, pd_load_f16, 2)

const pd_kernels pd_kernels_avx512 = {
    {reduce_f64_fast, reduce_f32_fast, reduce_f16_fast, NULL},
    {reduce_f64_exact, reduce_f32_exact, reduce_f16_exact, NULL}};
#endif
