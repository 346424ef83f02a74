/* AVX2 (+F16C for float16) reduction kernels: 4 float64 lanes, see reduce_template.h. */
#include "common.h"
#ifdef PD_X86
#include <immintrin.h>

#define PD_TARGET __attribute__((target("avx2,f16c")))
typedef __m256d pd_v;
#define PD_W 4
#define pd_v_zero() _mm256_setzero_pd()
#define pd_v_set1(x) _mm256_set1_pd(x)
#define pd_v_add(a, b) _mm256_add_pd(a, b)
#define pd_v_max(a, b) _mm256_max_pd(a, b)
#define pd_v_sub(a, b) _mm256_sub_pd(a, b)
#define pd_v_store(d, v) _mm256_storeu_pd(d, v)
#define pd_v_abs(v) _mm256_andnot_pd(_mm256_set1_pd(-0.0), v)

PD_TARGET static inline double pd_v_hsum(__m256d v)
{
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
PD_TARGET static inline double pd_v_hmax(__m256d v)
{
    __m128d s = _mm_max_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_max_sd(s, _mm_unpackhi_pd(s, s)));
}
PD_TARGET static inline __m256d ld_f64(const char *p) { return _mm256_loadu_pd((const double *)p); }
PD_TARGET static inline __m256d ld_f32(const char *p) { return _mm256_cvtps_pd(_mm_loadu_ps((const float *)p)); }
PD_TARGET static inline __m256d ld_f16(const char *p)
{
    return _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p)));
}

#include "reduce_template.h"
PD_DEFINE_REDUCE(reduce_f64, ld_f64, pd_load_f64, 8)
PD_DEFINE_REDUCE(reduce_f32, ld_f32, pd_load_f32, 4)
PD_DEFINE_REDUCE(reduce_f16, ld_f16, pd_load_f16, 2)

const pd_kernels pd_kernels_avx2 = {
    {reduce_f64_fast, reduce_f32_fast, reduce_f16_fast, NULL},
    {reduce_f64_exact, reduce_f32_exact, reduce_f16_exact, NULL}};
#endif
