/* Paired moments of two log-prob inputs in one read of each.  See moments.c. */
#ifndef PPLDELTA_MOMENTS_H
#define PPLDELTA_MOMENTS_H
#include "common.h"
#include "input.h"

typedef struct {
    double sum_o, sum_q;                 /* exactly rounded (math.fsum's) */
    double sum_oo, sum_qq, sum_oq;       /* compensated float64 */
    double sum_dp, sum_dp2, sum_dp4;     /* dp = exp(q) - exp(o), compensated float64 */
    npy_intp neginf_o, neginf_q;         /* -inf terms */
} pd_moments;

/* Optional outputs, allocated by the caller: per-group counts and exactly rounded sums of
 * codes[i] in [0, n_groups) (codes NULL: none), and block sums of o - q over consecutive
 * blocks of block_size values, the last one shorter (block_size 0: none). */
typedef struct {
    const npy_intp *codes;
    npy_intp n_groups;
    npy_int64 *group_n;
    double *group_sum_o, *group_sum_q;
    npy_intp block_size;
    double *block_d;
} pd_moments_extra;

/* so, sq: opened, non-empty, of equal size.  Validation and its messages are perplexity_delta's
 * (pd_delta_sums).  0, or -1 with an exception. */
int pd_paired_moments(pd_src *so, pd_src *sq, const char *name_o, const char *name_q, double tol,
                      const pd_moments_extra *x, pd_moments *out);
#endif
