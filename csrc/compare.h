#ifndef PPLDELTA_COMPARE_H
#define PPLDELTA_COMPARE_H
#include "logits.h"

/* Per-row outputs of pd_compare_run (refstats.compare's stage 1; see compare.c): bS (rows x K),
 * bP (rows x P, NULL without probes), top, bot (rows x M), and one value per row. */
typedef struct {
    double *bS, *bP, *top, *bot;
    double *HQ, *zq, *bmax, *QT, *sbT, *qbT, *Qbeyond;
    npy_int64 *nT, *ninfT, *argmax_q, *rank_q;
} pd_compare_out;

/* The stage-1 values of the rows of a (exps on the path isa, read under the GIL) against the stored ids (rows x K, int32, C order; entries
 * < 0 unused, all < V) and probe ids (rows x P, or NULL) on `threads` threads; needs no GIL.
 * Returns 0, or -1 with *bad_row set and *bad_kind = 2 (a row has NaN or +inf, or is all -inf)
 * or 3 (no memory). */
int pd_compare_run(pd_isa isa, const pd_mat *a, const int32_t *ids, npy_intp K, const int32_t *pids,
                   npy_intp P, npy_intp M, int threads, const pd_compare_out *out,
                   npy_intp *bad_row, int *bad_kind);
#endif
