/* SSE2 reduction kernels (the x86-64 baseline): 2 float64 lanes, see reduce_template.h.
 * float16/bfloat16 have no SSE2 conversion and use the portable kernels. */
#include "common.h"
#ifdef PD_X86
#include <emmintrin.h>

#define PD_TARGET __attribute__((target("sse2")))
typedef __m128d pd_v;
#define PD_W 2
#define pd_v_zero() _mm_setzero_pd()
#define pd_v_set1(x) _mm_set1_pd(x)
#define pd_v_add(a, b) _mm_add_pd(a, b)
#define pd_v_max(a, b) _mm_max_pd(a, b)
#define pd_v_sub(a, b) _mm_sub_pd(a, b)
#define pd_v_store(d, v) _mm_storeu_pd(d, v)
#define pd_v_abs(v) _mm_andnot_pd(_mm_set1_pd(-0.0), v)

PD_TARGET static inline double pd_v_hsum(__m128d v) { return _mm_cvtsd_f64(_mm_add_sd(v, _mm_unpackhi_pd(v, v))); }
PD_TARGET static inline double pd_v_hmax(__m128d v) { return _mm_cvtsd_f64(_mm_max_sd(v, _mm_unpackhi_pd(v, v))); }
PD_TARGET static inline __m128d ld_f64(const char *p) { return _mm_loadu_pd((const double *)p); }
PD_TARGET static inline __m128d ld_f32(const char *p)
{
    return _mm_cvtps_pd(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)p)));
}

#include "reduce_template.h"
PD_DEFINE_REDUCE(reduce_f64, ld_f64, pd_load_f64, 8)
PD_DEFINE_REDUCE(reduce_f32, ld_f32, pd_load_f32, 4)

const pd_kernels pd_kernels_sse2 = {
    {reduce_f64_fast, reduce_f32_fast, NULL, NULL},
    {reduce_f64_exact, reduce_f32_exact, NULL, NULL}};
#endif
