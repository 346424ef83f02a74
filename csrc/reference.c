/* The exactness numerics of perplexity_delta: the reference's formulas and quality bands, its
 * round(x, 4), and the proof that lets the fast pass stand in for the exact one.
 *
 * Contract.  perplexity_delta returns the reference's dict (avg = sum / n, ppl = exp(-avg),
 * abs = ppl_q - ppl_o, rel = abs / ppl_o * 100, each rounded with round(x, 4); the quality from
 * the unrounded rel) computed from the exactly rounded sums (math.fsum's) of the two inputs.
 *
 * Chain (pd_delta_sums): fast pass -> certificate -> exact pass.
 *  1. The fast kernels (reduce_template.h) sum at memory bandwidth with
 *     |s_fast - S| <= PD_FAST_ERR * sum|x| (common.h), and sum|x| <= -s + 2 n tol because every
 *     term x <= tol.  So eo = PD_FAST_ERR (-s_o + 2 n tol) bounds the error of s_o (same for q).
 *  2. The certificate (pd_fields_fragile) propagates eo, eq through the formulas in the
 *     reference's order, each step adding its own roundings:
 *       mean:  |d avg| <= e / n + 2 eps |s / n|           (the quotient's rounding, twice)
 *       exp:   |d ppl| <= ppl (1.01 |d avg| + 4 eps)       (relative error = absolute error of
 *                                                           the argument, to first order; 1.01
 *                                                           covers the second order, 4 eps exp's
 *                                                           own ulps)
 *       abs:   d_o + d_q + 4 eps (ppl_o + ppl_q)
 *       rel:   1.01 * 100 (d_abs / ppl_o + |abs| d_o / ppl_o^2) + 8 eps |rel|
 *     and asks, for every field v with error bound d, whether some v' with |v' - v| <= d rounds
 *     to 4 decimals differently (pd_near_round4: the distance of v * 1e4 to the nearest
 *     half-integer, with 8 eps |v| of slack for the scaling), and whether rel is within d_rel of
 *     a quality threshold.  If nothing can move, the fast result is provably the exact one.
 *     A -inf term makes a sum exactly -inf: then only the original's perplexity can move.
 *  3. Otherwise (inputs built to sit near a boundary, about one call in 10^4 on random data)
 *     the exact kernels sum again with a rigorous error bound and pd_acc_exact's certificate
 *     (common.h), and where that fails too, the superaccumulator (exact.c) decides.
 *
 * round(x, 4) (pd_round4_fast) is Python's float.__round__ bit for bit, without its dtoa round
 * trip: for a = |x| with p = fl(a * 1e4) < 2^52, e = fma(a, 1e4, -p) is the exact rounding error,
 * so the exact product is p + e; k = floor(p) and d = p - k are exact, d - 0.5 is exact whenever
 * it can be near 0 (Sterbenz), and |e| < ulp(p) <= 0.5 decides the side of a half.  R / 1e4 is
 * then the double nearest R * 10^-4, which is what Python's strtod returns.
 */
#include "reference.h"
#include <float.h>

Py_ssize_t pd_n_fast, pd_n_exact, pd_n_sacc;

const char *const pd_quality_names[PD_NQUALITY] = {"excellent", "good", "acceptable", "poor"};
const double pd_quality_thresholds[PD_NQUALITY - 1] = {1.0, 5.0, 10.0};

int pd_quality(double rel)
{
    int k;
    for (k = 0; k < PD_NQUALITY - 1; k++)
        if (rel < pd_quality_thresholds[k])
            return k;
    return PD_NQUALITY - 1; /* also NaN */
}

void pd_fields_eval(double so, double sq, npy_intp n, pd_fields *f)
{
    double avg_q = sq / (double)n;
    f->avg_o = so / (double)n;
    f->ppl_o = exp(-f->avg_o);
    f->ppl_q = exp(-avg_q);
    f->abs = f->ppl_q - f->ppl_o;
    f->rel = f->ppl_o > 0 ? (f->abs / f->ppl_o) * 100 : 0.0;
}

double pd_round4_fast(double x, int *exact)
{
    double a = fabs(x), p, e, k, t, r;
    *exact = 1;
    if (!isfinite(x) || x == 0.0)
        return x;
    p = a * 1e4;
    if (!(p < 4503599627370496.0)) { /* 2^52 */
        *exact = 0;
        return x;
    }
    e = fma(a, 1e4, -p);
    k = floor(p);
    t = (p - k) - 0.5;
    if (t < 0.0 || (t == 0.0 && e < 0.0))
        r = k;
    else if (t > 0.0 || e > 0.0)
        r = k + 1.0;
    else
        r = fmod(k, 2.0) == 0.0 ? k : k + 1.0; /* exact tie: to even */
    return copysign(r / 1e4, x);
}

/* ----------------------------------------------------------------------------- certificate */

/* Could round(v', 4) differ from round(v, 4) for some |v' - v| <= d? */
static int pd_near_round4(double v, double d)
{
    double y = fabs(v) * 1e4, fr;
    if (!isfinite(v) || !isfinite(d) || y >= 1e15)
        return 1;
    fr = y - floor(y);
    return fabs(fr - 0.5) * 1e-4 <= d + fabs(v) * 8 * DBL_EPSILON;
}

/* Step 2 of the chain (see the top of this file): 1 when a rounded field or the quality band
 * of the fast sums so, sq could differ from the exact sums'.  q_neginf: sq is -inf from a -inf
 * term (exact), so only the original's perplexity can move. */
static int pd_fields_fragile(const pd_fields *f, double so, double sq, npy_intp n, double tol,
                             int q_neginf)
{
    const double eps = DBL_EPSILON;
    double nn = (double)n, eo, eq, dmo, dmq, d_o, d_q, d_abs, d_rel;
    int k;
    if (!isfinite(tol) || !isfinite(so) || !(isfinite(sq) || q_neginf))
        return 1;
    eo = PD_FAST_ERR * (-so + 2.0 * nn * tol);
    dmo = eo / nn + 2 * eps * fabs(so / nn);
    d_o = f->ppl_o * (1.01 * dmo + 4 * eps);
    if (q_neginf) /* quantized_perplexity, the deltas: inf exactly; quality: poor */
        return pd_near_round4(f->ppl_o, d_o);
    eq = PD_FAST_ERR * (-sq + 2.0 * nn * tol);
    dmq = eq / nn + 2 * eps * fabs(sq / nn);
    d_q = f->ppl_q * (1.01 * dmq + 4 * eps);
    d_abs = d_o + d_q + 4 * eps * (f->ppl_o + f->ppl_q);
    d_rel = 1.01 * 100 * (d_abs / f->ppl_o + fabs(f->abs) * d_o / (f->ppl_o * f->ppl_o)) +
            8 * eps * fabs(f->rel);
    if (pd_near_round4(f->ppl_o, d_o) || pd_near_round4(f->ppl_q, d_q) ||
        pd_near_round4(f->abs, d_abs) || pd_near_round4(f->rel, d_rel))
        return 1;
    for (k = 0; k < PD_NQUALITY - 1; k++)
        if (fabs(f->rel - pd_quality_thresholds[k]) <= d_rel)
            return 1;
    return 0;
}

/* ----------------------------------------------------------------------------- the chain */

int pd_exact_finish(pd_src *src, const char *name, double tol, const pd_acc *acc, double *out)
{
    pd_acc big_acc = PD_ACC_ZERO;
    pd_sacc big;
    if (pd_acc_exact(acc, out))
        return 0;
    pd_n_sacc++;
    memset(&big, 0, sizeof big);
    big_acc.sacc = &big;
    if (pd_src_sum(src, name, tol, PD_MODE_SACC, &big_acc) < 0)
        return -1;
    /* (infinities here only if a list changed between the passes) */
    *out = pd_acc_inf(&big_acc) ? pd_acc_value(&big_acc) : pd_sacc_value(&big);
    return 0;
}

int pd_exact_sum(pd_src *src, const char *name, double tol, double *out)
{
    pd_acc acc = PD_ACC_ZERO;
    if (pd_src_sum(src, name, tol, PD_MODE_EXACT, &acc) < 0)
        return -1;
    return pd_exact_finish(src, name, tol, &acc, out);
}

int pd_delta_sums(pd_src *so, pd_src *sq, const char *name_o, const char *name_q, double tol,
                  double *sum_o, double *sum_q)
{
    pd_acc ao = PD_ACC_ZERO, aq = PD_ACC_ZERO;
    pd_fields f;
    double xo, xq;
    int io, iq;
    /* 1. fast pass (validates: the original first) */
    if (pd_src_sum(so, name_o, tol, PD_MODE_FAST, &ao) < 0 ||
        pd_src_sum(sq, name_q, tol, PD_MODE_FAST, &aq) < 0)
        return -1;
    xo = pd_acc_value(&ao);
    xq = pd_acc_value(&aq);
    io = pd_acc_inf(&ao);
    iq = pd_acc_inf(&aq);
    /* 2. certificate: infinite terms settle a sum exactly */
    pd_fields_eval(xo, xq, so->n, &f);
    if ((io && (iq || xo == -INFINITY)) ||
        !pd_fields_fragile(&f, xo, xq, so->n, tol, iq && xq == -INFINITY)) {
        pd_n_fast++;
    }
    else { /* 3. exact pass, never over an input an infinite term already settles */
        pd_n_exact++;
        if ((!io && pd_exact_sum(so, name_o, tol, &xo) < 0) ||
            (!iq && pd_exact_sum(sq, name_q, tol, &xq) < 0))
            return -1;
    }
    *sum_o = xo;
    *sum_q = xq;
    return 0;
}
