/* The reference's formulas, its quality bands, round(x, 4), and the chain that makes
 * perplexity_delta exact: fast pass -> certificate -> exact pass.  See reference.c. */
#ifndef PPLDELTA_REFERENCE_H
#define PPLDELTA_REFERENCE_H
#include "common.h"
#include "input.h"

#define PD_DEFAULT_TOL 1e-3

/* The quality bands: relative delta (%) < pd_quality_thresholds[k] gives pd_quality_names[k];
 * at or above the last threshold (or NaN) the last name. */
#define PD_NQUALITY 4
extern const char *const pd_quality_names[PD_NQUALITY];
extern const double pd_quality_thresholds[PD_NQUALITY - 1];
int pd_quality(double relative_delta_pct);

/* The reference's fields from the two sums and the count, in its order of operations. */
typedef struct {
    double avg_o, ppl_o, ppl_q, abs, rel;
} pd_fields;
void pd_fields_eval(double sum_o, double sum_q, npy_intp n, pd_fields *f);

/* round(x, 4) as Python's float.__round__ for |x| * 1e4 < 2^52 (and non-finite x); *exact = 0
 * beyond that range, where the caller asks float.__round__ itself. */
double pd_round4_fast(double x, int *exact);

/* The exactly rounded sum (math.fsum's) of an opened, non-empty source: the exact kernels, and
 * where their certificate fails, the superaccumulator pass.  pd_exact_finish does the second
 * half for an accumulator the exact kernels already filled. */
int pd_exact_sum(pd_src *src, const char *name, double tol, double *out);
int pd_exact_finish(pd_src *src, const char *name, double tol, const pd_acc *acc, double *out);

/* perplexity_delta's sums of two opened, non-empty sources of equal size: the fast pass, and
 * the exact pass only where the certificate (pd_fields_fragile) cannot prove that the rounded
 * reference fields and the quality band of the fast sums are those of the exact sums.  The
 * results feed pd_fields_eval.  0, or -1 with an exception (validation: the original first). */
int pd_delta_sums(pd_src *so, pd_src *sq, const char *name_o, const char *name_q, double tol,
                  double *sum_o, double *sum_q);

/* Testing hook: certified fast results, exact passes, superaccumulator passes (GIL-protected). */
extern Py_ssize_t pd_n_fast, pd_n_exact, pd_n_sacc;
#endif
