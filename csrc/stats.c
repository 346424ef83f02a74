/* Kernels of the analysis layer: the paired block bootstrap and segmented (per-group) exact sums.
 *
 * block_bootstrap: replicate r draws nb blocks with replacement (xoshiro256**, seeded through
 * splitmix64, bounded integers by Lemire's multiply-shift with rejection, so a seed gives the
 * same replicates on every platform) and returns sum(num[idx]) / sum(den[idx]): with num the
 * per-block sum of nll_q - nll_o and den the block's token count, that is the token-weighted
 * mean of ln(PPL_Q / PPL_O) over the resampled corpus.  O(n_boot * nb), GIL released.
 *
 * segment_sums: one pass over the values, each added to its group's triple-double accumulator
 * with its error bound (common.h), then each group's certificate (pd_acc_exact); the groups
 * where it fails get a superaccumulator and a second pass.  So every group's total is the
 * exactly rounded sum of its values, as if that group had been reduced alone.
 */
#include "stats.h"
#include <stdlib.h>

static uint64_t pd_splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline uint64_t pd_rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

typedef struct {
    uint64_t s[4];
} pd_rng;

static void pd_rng_seed(pd_rng *r, uint64_t seed)
{
    int i;
    for (i = 0; i < 4; i++)
        r->s[i] = pd_splitmix64(&seed);
}

static inline uint64_t pd_rng_next(pd_rng *r)
{
    uint64_t *s = r->s, result = pd_rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = pd_rotl(s[3], 45);
    return result;
}

/* Uniform integer in [0, n), n < 2^32, unbiased. */
static inline uint32_t pd_rng_below(pd_rng *r, uint32_t n)
{
    uint64_t m = (pd_rng_next(r) >> 32) * (uint64_t)n;
    uint32_t low = (uint32_t)m;
    if (low < n) {
        uint32_t threshold = (uint32_t)(-n) % n;
        while (low < threshold) {
            m = (pd_rng_next(r) >> 32) * (uint64_t)n;
            low = (uint32_t)m;
        }
    }
    return (uint32_t)(m >> 32);
}

void pd_block_bootstrap(const double *num, const double *den, npy_intp nb, npy_intp n_boot,
                        uint64_t seed, double *out)
{
    pd_rng rng;
    npy_intp r, k;
    pd_rng_seed(&rng, seed);
    for (r = 0; r < n_boot; r++) {
        pd_csum sn = {0.0, 0.0}; /* compensated numerator: its terms have both signs */
        double sd = 0.0;
        for (k = 0; k < nb; k++) {
            uint32_t i = pd_rng_below(&rng, (uint32_t)nb);
            pd_csum_add(&sn, num[i]);
            sd += den[i]; /* integer token counts: exact below 2^53 */
        }
        out[r] = (sn.s + sn.c) / sd; /* (NaN once a term is infinite) */
    }
}

int pd_segment_sums(const npy_intp *codes, const double *values, npy_intp n, npy_intp n_groups,
                    pd_acc *acc, npy_intp *counts, double *sums)
{
    npy_intp i, g, nbig = 0;
    pd_sacc *big;
    for (i = 0; i < n; i++) {
        g = codes[i];
        pd_acc_add(&acc[g], values[i]);
        counts[g]++;
    }
    for (g = 0; g < n_groups; g++)
        nbig += !pd_acc_exact(&acc[g], &sums[g]);
    if (nbig == 0)
        return 0;
    /* the certificate failed for nbig groups: superaccumulate their values in a second pass */
    big = calloc((size_t)nbig, sizeof *big);
    if (big == NULL)
        return -1;
    for (g = 0, nbig = 0; g < n_groups; g++)
        if (!pd_acc_exact(&acc[g], &sums[g]))
            acc[g].sacc = &big[nbig++];
    for (i = 0; i < n; i++)
        if (acc[codes[i]].sacc) /* no infinities: pd_acc_exact settles those */
            pd_sacc_add(acc[codes[i]].sacc, values[i]);
    for (g = 0; g < n_groups; g++)
        if (acc[g].sacc)
            sums[g] = pd_sacc_value(acc[g].sacc);
    free(big);
    return 0;
}
