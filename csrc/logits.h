#ifndef PPLDELTA_LOGITS_H
#define PPLDELTA_LOGITS_H
#include "common.h"

/* A (rows x V) matrix whose rows are contiguous (row stride in bytes), of one pd_dtype. */
typedef struct {
    const char *base;
    npy_intp rows, V, rstride;
    pd_dtype dt;
} pd_mat;

/* Per-row outputs of pd_logits_run (NULL where not wanted). */
typedef struct {
    double *lp_a, *lp_b;     /* log-softmax at the target (needs targets), NaN where ignored */
    double *kld, *kld_rev;   /* KL(P||Q), KL(Q||P) in nats (needs b) */
    npy_bool *same_top1;     /* argmax a == argmax b (needs b) */
    npy_int64 *rank_b;       /* #{j : b_j > b[argmax a]}: P's top-1 is in Q's top-k iff < k */
    npy_int64 *rank_a;       /* #{j : a_j > a[argmax b]}: Q's top-1 is in P's top-k iff < k */
} pd_logits_out;

/* Runs the row kernels fn (pd_logits_kernel(a->dt), resolved while holding the GIL) over a
 * (and b, when b->base != NULL) on `threads` threads; needs no GIL.
 * Returns 0, or -1 with *bad_row set and *bad_kind = 1 (target out of range) or 2 (row has
 * NaN or +inf, or is all -inf). */
/* Rows [0, rows) in `threads` contiguous shares, one thread each (the caller's thread takes the
 * first; a share whose thread cannot start runs on the caller's).  `run(ctx, r0, r1, &bad_row,
 * &bad_kind)` does one share and leaves bad_row at -1 or sets the first bad row of its share.
 * Returns 0, or -1 with the first bad row in row order (and its kind).  No GIL needed. */
typedef void (*pd_rows_fn)(void *ctx, npy_intp r0, npy_intp r1, npy_intp *bad_row, int *bad_kind);
int pd_run_rows(pd_rows_fn run, void *ctx, npy_intp rows, int threads, npy_intp *bad_row, int *bad_kind);

int pd_logits_run(const pd_logits_fns *fn, const pd_mat *a, const pd_mat *b,
                  const npy_int64 *targets, npy_int64 ignore, int threads,
                  const pd_logits_out *out, npy_intp *bad_row, int *bad_kind);
#endif
