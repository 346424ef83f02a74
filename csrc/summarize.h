#ifndef PPLDELTA_SUMMARIZE_H
#define PPLDELTA_SUMMARIZE_H
#include "logits.h"

/* A top-K candidate (value, id) and its order, shared with compare.c's filters: a ranks before b
 * when its value is larger, ties by smaller id (ids are distinct: a strict order). */
typedef struct {
    double v;
    npy_intp id;
} pd_cand;

static inline int pd_before(const pd_cand *a, const pd_cand *b)
{
    return a->v > b->v || (a->v == b->v && a->id < b->id);
}

int pd_cand_cmp(const void *x, const void *y); /* qsort: best first */
int pd_id_cmp(const void *x, const void *y);   /* qsort: npy_intp ascending */
void pd_select(pd_cand *c, npy_intp n, npy_intp k); /* c[0 .. k) := the k first of c (0 < k < n) */

/* Per-row outputs of pd_summarize_run (refstats.RECORD_DTYPE's fields but token and lp):
 * entropy, tail, lp_min (rows); ids, lps (rows x k); pids, plps (rows x probes). */
typedef struct {
    double *entropy, *tail, *lp_min;
    int32_t *ids, *pids;
    float *lps, *plps;
} pd_summary_out;

/* The reference records of the rows of a (see summarize.c) on `threads` threads with the kernels
 * of the active SIMD path (isa, read under the GIL); needs no GIL.  offsets: each row's probe
 * offset u in [0, 1) (probe j at (j + u)/probes of the tail's total), or NULL for u = 1/2.  Returns 0, or -1 with
 * *bad_row set and *bad_kind = 2 (a row has NaN or +inf, or is all -inf) or 3 (no memory). */
/* e[i] = exp(x[i]) (x[i] <= 0, -inf or below -746 giving 0) with this kernel's float64 exp:
 * within 2.5 ulp, the same bits on every SIMD path (isa: the active one).  compare.c uses it. */
void pd_exp_many(pd_isa isa, const double *x, double *e, npy_intp n);
/* len values of dtype dt at p (contiguous) as float64 into b, with the conversions compiled for
 * the path isa (the same values on every path); compare.c uses it. */
void pd_load_many(pd_isa isa, pd_dtype dt, const char *p, npy_intp len, double *b);

/* The probes' running sum r + p[0] + p[1] + ... (p >= 0) as the path isa computes it: returns the
 * total and writes its value after every block of 64 values (and after the last) into out
 * (ceil(n / 64) values); equal to the one-add-at-a-time sum on every path (testing hook). */
double pd_runsum(pd_isa isa, const double *p, npy_intp n, double r, double *out);

int pd_summarize_run(pd_isa isa, const pd_mat *a, npy_intp k, npy_intp probes, const double *offsets,
                     int threads, const pd_summary_out *out, npy_intp *bad_row, int *bad_kind);
#endif
