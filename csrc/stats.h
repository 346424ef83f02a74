#ifndef PPLDELTA_STATS_H
#define PPLDELTA_STATS_H
#include "common.h"

/* out[r] = sum(num[idx_r]) / sum(den[idx_r]) for n_boot replicates of nb blocks drawn with
 * replacement; nb must be in [1, 2^31). */
void pd_block_bootstrap(const double *num, const double *den, npy_intp nb, npy_intp n_boot,
                        uint64_t seed, double *out);

/* counts[g] and sums[g], the exactly rounded sum of the values of group g = codes[i]; codes
 * must lie in [0, n_groups), acc[] zeroed scratch.  0, or -1 when out of memory.  No GIL. */
int pd_segment_sums(const npy_intp *codes, const double *values, npy_intp n, npy_intp n_groups,
                    pd_acc *acc, npy_intp *counts, double *sums);
#endif
