/* AArch64 NEON reduction kernels: 2 float64 lanes, see reduce_template.h.  Compiled only on
 * AArch64, where NEON is baseline (no run-time check needed). */
#include "common.h"
#ifdef PD_NEON
#include <arm_neon.h>

#define PD_TARGET
typedef float64x2_t pd_v;
#define PD_W 2
#define pd_v_zero() vdupq_n_f64(0.0)
#define pd_v_set1(x) vdupq_n_f64(x)
#define pd_v_add(a, b) vaddq_f64(a, b)
/* vmaxq propagates NaN; the block sum catches NaN anyway, so either behaviour is fine. */
#define pd_v_max(a, b) vmaxq_f64(a, b)
#define pd_v_sub(a, b) vsubq_f64(a, b)
#define pd_v_store(d, v) vst1q_f64(d, v)
#define pd_v_abs(v) vabsq_f64(v)

static inline double pd_v_hsum(float64x2_t v) { return vgetq_lane_f64(v, 0) + vgetq_lane_f64(v, 1); }
static inline double pd_v_hmax(float64x2_t v)
{
    double a = vgetq_lane_f64(v, 0), b = vgetq_lane_f64(v, 1);
    return a > b ? a : b;
}
static inline float64x2_t ld_f64(const char *p) { return vld1q_f64((const double *)p); }
static inline float64x2_t ld_f32(const char *p) { return vcvt_f64_f32(vld1_f32((const float *)p)); }

#include "reduce_template.h"
PD_DEFINE_REDUCE(reduce_f64, ld_f64, pd_load_f64, 8)
PD_DEFINE_REDUCE(reduce_f32, ld_f32, pd_load_f32, 4)

const pd_kernels pd_kernels_neon = {
    {reduce_f64_fast, reduce_f32_fast, NULL, NULL},
    {reduce_f64_exact, reduce_f32_exact, NULL, NULL}};
#endif
