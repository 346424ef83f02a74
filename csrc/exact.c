/* The exact fallback of every reduction: the superaccumulator of common.h (carries and final
 * rounding here) and its kernels, one per dtype, shared by every ISA and layout.  They run only
 * when the exact kernels' certificate (pd_acc_exact) fails, that is on inputs built to sit
 * within err of a rounding boundary: a second pass over the raw values, about 1.5 ns a value,
 * no allocation. */
#include "common.h"

void pd_sacc_norm(pd_sacc *s)
{
    int i;
    for (i = 0; i < PD_SACC_DIGITS - 1; i++) {
        int64_t low = s->d[i] & (int64_t)0xffffffff; /* int64_t is two's complement */
        s->d[i + 1] += (s->d[i] - low) / ((int64_t)1 << 32); /* exact division: a carry */
        s->d[i] = low;
    }
    s->pending = 0;
}

static int pd_sacc_bit(const pd_sacc *s, int64_t i) { return (int)((s->d[i >> 5] >> (i & 31)) & 1); }

double pd_sacc_value(pd_sacc *s)
{
    int i, t, neg;
    int64_t len, b;
    uint64_t q = 0;
    double v;
    pd_sacc_norm(s); /* digits 0..70 in [0, 2^32), the sign in digit 71 */
    neg = s->d[PD_SACC_DIGITS - 1] < 0;
    if (neg) {
        for (i = 0; i < PD_SACC_DIGITS; i++)
            s->d[i] = -s->d[i];
        pd_sacc_norm(s);
    }
    for (t = PD_SACC_DIGITS - 1; t >= 0 && s->d[t] == 0; t--)
        ;
    if (t < 0)
        return 0.0;
    for (len = 32 * (int64_t)t; (s->d[t] >> (len - 32 * (int64_t)t)) != 0; len++)
        ; /* bit length of the magnitude M (in units of 2^-1074) */
    if (len <= 53) { /* M * 2^-1074 is a double (subnormal, or normal with <= 53 bits) */
        for (b = len - 1; b >= 0; b--)
            q = (q << 1) | (uint64_t)pd_sacc_bit(s, b);
        v = ldexp((double)q, -1074);
    }
    else { /* the top 53 bits, then round half to even on the next bit and the sticky rest */
        int half, sticky = 0;
        for (b = len - 1; b >= len - 53; b--)
            q = (q << 1) | (uint64_t)pd_sacc_bit(s, b);
        half = pd_sacc_bit(s, len - 54);
        for (b = len - 55; b >= 0 && !sticky; b--) {
            if ((b & 31) == 31 && s->d[b >> 5] == 0) {
                b -= 31; /* skip a zero digit */
                continue;
            }
            sticky = pd_sacc_bit(s, b);
        }
        if (half && (sticky || (q & 1)))
            q++; /* 2^53 is still exact */
        v = ldexp((double)q, (int)(len - 53 - 1074)); /* +inf beyond DBL_MAX */
    }
    return neg ? -v : v;
}

/* Mode 2 kernels: validate like the others, record infinities, superaccumulate the rest.  The
 * stride is the element step (contiguous callers pass the item size). */
#define PD_DEFINE_SACC(NAME, LOADS)                                                           \
    static npy_intp NAME(const char *p, npy_intp n, npy_intp stride, double tol, pd_acc *acc)  \
    {                                                                                         \
        npy_intp i;                                                                           \
        for (i = 0; i < n; i++) {                                                             \
            double x = LOADS(p + i * stride);                                                 \
            if (pd_is_bad(x, tol))                                                            \
                return i;                                                                     \
            if (isinf(x))                                                                     \
                pd_acc_add(acc, x);                                                           \
            else                                                                              \
                pd_sacc_add(acc->sacc, x);                                                    \
        }                                                                                     \
        return -1;                                                                            \
    }
PD_DEFINE_SACC(sacc_f64, pd_load_f64)
PD_DEFINE_SACC(sacc_f32, pd_load_f32)
PD_DEFINE_SACC(sacc_f16, pd_load_f16)

const pd_reduce_fn pd_reduce_sacc[PD_NDTYPES] = {sacc_f64, sacc_f32, sacc_f16, NULL};
