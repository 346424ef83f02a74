/* Portable C reduction kernels: the reference every SIMD path is tested against, the strided
 * path of every ISA (any stride: negative, zero, unaligned), and the contiguous path where no
 * SIMD kernel exists.  The same template as the SIMD kernels, with a one-lane "vector" and the
 * stride as the element step.  Memory traffic: one read of the input.
 */
#include "common.h"

#define PD_TARGET
typedef double pd_v;
#define PD_W 1
#define pd_v_zero() 0.0
#define pd_v_set1(x) (x)
#define pd_v_add(a, b) ((a) + (b))
#define pd_v_sub(a, b) ((a) - (b))
#define pd_v_max(a, b) ((a) > (b) ? (a) : (b)) /* a NaN `a` yields b, as the x86 max does */
#define pd_v_store(d, v) (*(d) = (v))
#define pd_v_abs(v) fabs(v)
#define pd_v_hsum(v) (v)
#define pd_v_hmax(v) (v)

#include "reduce_template.h"
PD_DEFINE_REDUCE(reduce_f64, pd_load_f64, pd_load_f64, stride)
PD_DEFINE_REDUCE(reduce_f32, pd_load_f32, pd_load_f32, stride)
PD_DEFINE_REDUCE(reduce_f16, pd_load_f16, pd_load_f16, stride)

npy_intp pd_reduce_strided(pd_dtype dt, int mode, const char *p, npy_intp n, npy_intp stride,
                           double tol, pd_acc *acc)
{
    /* dt is never PD_BF16 here: input.c only reduces float64/32/16 natively */
    pd_reduce_fn f = mode == PD_MODE_SACC    ? pd_reduce_sacc[dt]
                     : mode == PD_MODE_EXACT ? pd_kernels_scalar.reduce_exact[dt]
                                             : pd_kernels_scalar.reduce[dt];
    return f(p, n, stride, tol, acc);
}

const pd_kernels pd_kernels_scalar = {
    {reduce_f64_fast, reduce_f32_fast, reduce_f16_fast, NULL},
    {reduce_f64_exact, reduce_f32_exact, reduce_f16_exact, NULL}};
