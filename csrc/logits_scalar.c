/* Portable logits row kernels, computed in float64 with libm's exp: the reference the SIMD
 * kernels are tested against, and the only path for float64 logits. */
#include "common.h"

#define PD_TARGET
#define PD_FT double
typedef double pd_f;
#define PD_FW 1
#define pd_f_set1(x) ((double)(x))
#define pd_f_zero() 0.0
#define pd_f_add(a, b) ((a) + (b))
#define pd_f_sub(a, b) ((a) - (b))
#define pd_f_mul(a, b) ((a) * (b))
#define pd_f_max(a, b) ((a) > (b) ? (a) : (b))
#define pd_f_hmax(v) (v)
#define pd_f_hsum(v) (v)
#define pd_f_exp(x) exp(x)
#define pd_f_nanmask_or(acc, x) ((acc) + ((x) != (x)))
#define pd_f_anynan(acc) ((acc) != 0)
#define pd_f_gt_count(x, t) ((x) > (t))
#define pd_f_pos(x) ((x) > 0)
#define pd_f_and(a, m) ((m) ? (a) : 0.0)

#include "logits_template.h"
PD_DEFINE_LOGITS(lg_f64, pd_load_f64, pd_load_f64, 8)
PD_DEFINE_LOGITS(lg_f32, pd_load_f32, pd_load_f32, 4)
PD_DEFINE_LOGITS(lg_f16, pd_load_f16, pd_load_f16, 2)
PD_DEFINE_LOGITS(lg_bf16, pd_load_bf16, pd_load_bf16, 2)

const pd_logits_kernels pd_logits_scalar = {
    {PD_LOGITS_TABLE_ENTRY(lg_f64), PD_LOGITS_TABLE_ENTRY(lg_f32), PD_LOGITS_TABLE_ENTRY(lg_f16),
     PD_LOGITS_TABLE_ENTRY(lg_bf16)}};
