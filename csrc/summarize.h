#ifndef PPLDELTA_SUMMARIZE_H
#define PPLDELTA_SUMMARIZE_H
#include "logits.h"

/* Per-row outputs of pd_summarize_run (refstats.RECORD_DTYPE's fields but token and lp):
 * entropy, tail, lp_min (rows); ids, lps (rows x k); pids, plps (rows x probes). */
typedef struct {
    double *entropy, *tail, *lp_min;
    int32_t *ids, *pids;
    float *lps, *plps;
} pd_summary_out;

/* The reference records of the rows of a (see summarize.c) on `threads` threads with the kernels
 * of the active SIMD path (isa, read under the GIL); needs no GIL.  Returns 0, or -1 with
 * *bad_row set and *bad_kind = 2 (a row has NaN or +inf, or is all -inf) or 3 (no memory). */
int pd_summarize_run(pd_isa isa, const pd_mat *a, npy_intp k, npy_intp probes, int threads,
                     const pd_summary_out *out, npy_intp *bad_row, int *bad_kind);
#endif
