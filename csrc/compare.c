/* Stage 1 of refstats.compare (docs/architecture.md, "The compare kernel"): from a quantized
 * model's logits row y (length V) and the stored ids S of its reference record, the O(K + M)
 * values that refstats.finish needs, in three reads of the row (the last two mostly from cache),
 * chunk by chunk (PD_CCH values converted to float64 in an L1 buffer).  "Tail" T is the row
 * minus the valid stored ids (ids >= 0, any order, duplicates counted once); with d = y - max,
 * S = sum e^d and ls = log S, b = d - ls is the log-softmax and q = e^d / S.  The stored ids
 * are sorted per row and masked (NaN) in the chunk wherever the tail is meant, so no tail value
 * is ever computed as a total minus the stored ones.
 *
 *   1a. max, first argmax, NaN / +inf check, rank_q = #{y > y[ids[0]]}, and the max and min of
 *      each of PD_CG groups of tail values per chunk (lane i: the indices = i mod 8).
 *   1b. over the tail the M largest and the M smallest values by threshold filters (a candidate
 *      buffer takes the values beyond the M-th best so far; when it is full the M best are
 *      selected and the threshold moves).  Each filter starts at the M-th best of the groups'
 *      extremes (pd_best_prime), which is at most the M-th best of the tail: about M candidates
 *      and no selection on a typical row, where a filter starting empty takes ~M ln(V/M) and
 *      selects every 256.
 *   2. e = exp(d) (the summarize kernel's float64 exp, pd_exp_many: vectorised where the path
 *      allows, the same bits on every path), and over the whole row S' (S but the first argmax's e = 1, so that
 *      ls = log1p(S') keeps its accuracy when one token holds nearly all the mass),
 *      W = sum_{e>0} e d, D2 = sum_{e>0} e d^2, the smallest finite d; over the tail: E_T = sum e,
 *      W_T = sum_{e>0} e d, sum of the finite d, the count of -inf, and the e of the values below
 *      the M-th largest (Qbeyond).
 *
 * Every output is a sum of terms of one sign (no cancellation):
 *   HQ = ls - W/S,  zq = (1+ls)^2 - 2(1+ls) W/S + D2/S,  QT = E_T/S,  qbT = (W_T - ls E_T)/S,
 *   sbT = sum_T,fin d - n_fin ls,  bmax = ls - min_fin d,  b at an id = (y - max) - ls.
 * Sums: 8 lanes by index mod 8 within a chunk, folded in a fixed order, chunk sums added with
 * Neumaier's compensation: each sum within (min(V, PD_CCH/8) + 8) u of the sum of |terms|
 * (u = 2^-53), inside the (V + 64) 2^-52 that the bounds' rounding margins allow
 * (docs/reference-bounds.md, E1); the exp is within 2.5 ulp (E1 allows 16), and each b = d - ls
 * within a few ulps of |b| (d = y - max rounded once, as the bounds assume).  So every float
 * output is within a few ulps of the row's scale (tests/test_compare_kernel.py writes the
 * tolerance down and pins it against the float64 NumPy oracle).
 * The chunk loops (pd_cmp_ops) in portable C, AVX2 and AVX-512 do the same operations in the
 * same lane order (no FMA; a term masked out is skipped or adds +0, which leaves a lane that
 * starts at +0 unchanged), and the exps give the same bits on every path: the same bytes on
 * every PPLDELTA_SIMD path and thread count.  Memory per thread: 3 chunk buffers,
 * 2 (M + max(M, 256)) candidates, K ids, 2 PD_CG ceil(V / PD_CCH) group extremes. */
#include "compare.h"
#include "summarize.h"
#include <stdlib.h>

#define PD_CCH 1024 /* values per chunk (a multiple of 8) */
#define PD_CG 8      /* groups per chunk: lane i, the indices = i mod 8 */

/* the M best of a candidate list: c[0 .. *n), threshold thr (candidates must beat it once full) */
typedef struct {
    pd_cand *c;
    npy_intp n;
    double thr;
    int full;
} pd_best;

static void pd_best_push(pd_best *b, npy_intp M, npy_intp cap, double v, npy_intp id)
{
    npy_intp i;
    b->c[b->n++] = (pd_cand){v, id};
    if (b->full && b->n < cap)
        return;
    if (b->full) { /* cap reached: keep the M best (a selection, not a sort) */
        pd_select(b->c, b->n, M);
        b->n = M;
    }
    else if (b->n < M)
        return;
    b->full = 1;
    for (b->thr = b->c[0].v, i = 1; i < M; i++)
        b->thr = b->c[i].v < b->thr ? b->c[i].v : b->thr;
}

/* Start a list at the threshold its groups' extremes prove: the M-th best of ng >= M distinct
 * tail values (g, reordered by summarize.c's selection) is at most the M-th best of the tail, so
 * the list takes every value at or above it (a threshold one step below) and is full from the
 * start. */
static void pd_best_prime(pd_best *b, pd_cand *g, npy_intp ng, npy_intp M)
{
    double t;
    npy_intp i;
    if (ng < M)
        return;
    if (ng > M)
        pd_select(g, ng, M);
    for (t = g[0].v, i = 1; i < M; i++)
        t = g[i].v < t ? g[i].v : t;
    b->full = 1;
    b->thr = nextafter(t, -INFINITY);
}

/* Neumaier's compensated sum (an infinite sum keeps its infinity) */
typedef struct {
    double s, c;
} pd_nsum;

static inline void pd_nsum_add(pd_nsum *a, double x)
{
    double t = a->s + x;
    if (isfinite(t))
        a->c += fabs(a->s) >= fabs(x) ? (a->s - t) + x : (x - t) + a->s;
    a->s = t;
}

static inline double pd_fold(const double *l)
{
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

/* ------------------------------------------------------------------------------- kernels
 * Over a chunk buffer of n8 values (a multiple of 8; lane i holds the indices = i mod 8): */
typedef struct {
    /* 1 if a y is NaN or +inf; else the max into *mx and #{y > y0} added to *rank */
    int (*stats)(const double *y, npy_intp n8, double y0, double *mx, npy_intp *rank);
    /* the first index >= j whose y is above hi or below lo (never a NaN), or n8 */
    npy_intp (*next_out)(const double *y, npy_intp j, npy_intp n8, double hi, double lo);
    /* the max and the min of each of the PD_CG groups of y (NaN left out: -inf / +inf if none) */
    void (*groups)(const double *y, npy_intp n8, double *gx, double *gn);
    /* s = the folded lane sums of e, e d and (e d) d (the last two where e > 0); *dmin: the
     * smallest finite d */
    void (*sums)(const double *d, const double *e, npy_intp n8, double *s, double *dmin);
    /* over the tail (the y that are not NaN): s = the folded lane sums of e, e d (e > 0), the
     * finite d and, when beyond, e where y < t; *ninf += #{d = -inf}, *neq += #{y = t} */
    void (*tail)(const double *y, const double *d, const double *e, npy_intp n8, int beyond,
                 double t, double *s, npy_intp *ninf, npy_intp *neq);
} pd_cmp_ops;

static int sc_stats(const double *y, npy_intp n8, double y0, double *mx, npy_intp *rank)
{
    double lm[8];
    npy_int64 lr[8] = {0}, lb[8] = {0};
    npy_intp j;
    int i, bad = 0;
    for (i = 0; i < 8; i++)
        lm[i] = -INFINITY;
    for (j = 0; j < n8; j += 8) /* 8 independent lanes, branch-free */
        for (i = 0; i < 8; i++) {
            double v = y[j + i];
            lb[i] |= !(v < INFINITY);
            lm[i] = v > lm[i] ? v : lm[i];
            lr[i] += v > y0;
        }
    for (i = 0; i < 8; i++) {
        bad |= lb[i] != 0;
        *mx = lm[i] > *mx ? lm[i] : *mx;
        *rank += lr[i];
    }
    return bad;
}

static npy_intp sc_next_out(const double *y, npy_intp j, npy_intp n8, double hi, double lo)
{
    while (j < n8 && !(y[j] > hi || y[j] < lo))
        j++;
    return j;
}

static void sc_groups(const double *y, npy_intp n8, double *gx, double *gn)
{
    npy_intp j;
    int g;
    for (g = 0; g < PD_CG; g++) {
        gx[g] = -INFINITY;
        gn[g] = INFINITY;
    }
    for (j = 0; j < n8; j++) {
        g = (int)(j & 7);
        gx[g] = y[j] > gx[g] ? y[j] : gx[g];
        gn[g] = y[j] < gn[g] ? y[j] : gn[g];
    }
}

static void sc_sums(const double *d, const double *e, npy_intp n8, double *s, double *dmin)
{
    double lS[8] = {0}, lW[8] = {0}, lD[8] = {0}, mn = *dmin;
    npy_intp j;
    for (j = 0; j < n8; j++) {
        double dj = d[j], ej = e[j];
        lS[j & 7] += ej;
        if (ej > 0) {
            double w = ej * dj;
            lW[j & 7] += w;
            lD[j & 7] += w * dj;
        }
        mn = dj > -INFINITY && dj < mn ? dj : mn;
    }
    s[0] = pd_fold(lS);
    s[1] = pd_fold(lW);
    s[2] = pd_fold(lD);
    *dmin = mn;
}

static void sc_tail(const double *y, const double *d, const double *e, npy_intp n8, int beyond,
                    double t, double *s, npy_intp *ninf, npy_intp *neq)
{
    double lE[8] = {0}, lW[8] = {0}, lS[8] = {0}, lB[8] = {0};
    npy_intp j;
    for (j = 0; j < n8; j++) {
        double ej = e[j], dj = d[j];
        if (y[j] != y[j])
            continue;
        lE[j & 7] += ej;
        if (ej > 0)
            lW[j & 7] += ej * dj;
        if (dj > -INFINITY)
            lS[j & 7] += dj;
        else
            ++*ninf;
        if (beyond) {
            if (y[j] < t)
                lB[j & 7] += ej;
            else
                *neq += y[j] == t;
        }
    }
    s[0] = pd_fold(lE);
    s[1] = pd_fold(lW);
    s[2] = pd_fold(lS);
    s[3] = pd_fold(lB);
}

static const pd_cmp_ops pd_cmp_scalar = {sc_stats, sc_next_out, sc_groups, sc_sums, sc_tail};

#ifdef PD_X86
#include <immintrin.h>
/* ---- AVX2: the 8 lanes as two __m256d (lanes 0-3, 4-7); a masked-out term adds +0 (a lane sum
 * starts at +0 and never becomes -0, so that is the same as not adding it) */
#define PD_C2 __attribute__((target("avx2")))
#define PD_MM2(a, b) ((unsigned)_mm256_movemask_pd(a) | (unsigned)_mm256_movemask_pd(b) << 4)

PD_C2 static double v2_fold(__m256d lo, __m256d hi) /* pd_fold's order */
{
    __m256d s = _mm256_add_pd(lo, hi);
    __m128d t = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    return _mm_cvtsd_f64(_mm_add_sd(t, _mm_unpackhi_pd(t, t)));
}

PD_C2 static int v2_stats(const double *y, npy_intp n8, double y0, double *mx, npy_intp *rank)
{
    __m256d m0 = _mm256_set1_pd(-INFINITY), m1 = m0, z = _mm256_set1_pd(y0), inf = _mm256_set1_pd(INFINITY);
    unsigned bad = 0;
    npy_intp j, nr = 0;
    double t[4];
    for (j = 0; j < n8; j += 8) {
        __m256d a = _mm256_loadu_pd(y + j), b = _mm256_loadu_pd(y + j + 4);
        bad |= PD_MM2(_mm256_cmp_pd(a, inf, _CMP_NLT_UQ), _mm256_cmp_pd(b, inf, _CMP_NLT_UQ));
        m0 = _mm256_max_pd(m0, a);
        m1 = _mm256_max_pd(m1, b);
        nr += __builtin_popcount(PD_MM2(_mm256_cmp_pd(a, z, _CMP_GT_OQ), _mm256_cmp_pd(b, z, _CMP_GT_OQ)));
    }
    if (bad)
        return 1;
    _mm256_storeu_pd(t, _mm256_max_pd(m0, m1));
    *mx = fmax(*mx, fmax(fmax(t[0], t[1]), fmax(t[2], t[3])));
    *rank += nr;
    return 0;
}

PD_C2 static npy_intp v2_next_out(const double *y, npy_intp j, npy_intp n8, double hi, double lo)
{
    __m256d h = _mm256_set1_pd(hi), l = _mm256_set1_pd(lo);
    npy_intp b = j & ~(npy_intp)7;
    unsigned skip = (1u << (j - b)) - 1; /* the block's values before j */
    for (; b < n8; b += 8, skip = 0) {
        __m256d v0 = _mm256_loadu_pd(y + b), v1 = _mm256_loadu_pd(y + b + 4);
        unsigned k = PD_MM2(_mm256_or_pd(_mm256_cmp_pd(v0, h, _CMP_GT_OQ), _mm256_cmp_pd(v0, l, _CMP_LT_OQ)),
                            _mm256_or_pd(_mm256_cmp_pd(v1, h, _CMP_GT_OQ), _mm256_cmp_pd(v1, l, _CMP_LT_OQ))) & ~skip;
        if (k)
            return b + __builtin_ctz(k);
    }
    return n8;
}

PD_C2 static void v2_groups(const double *y, npy_intp n8, double *gx, double *gn)
{
    __m256d x0 = _mm256_set1_pd(-INFINITY), x1 = x0, n0 = _mm256_set1_pd(INFINITY), n1 = n0;
    npy_intp j;
    for (j = 0; j < n8; j += 8) {
        __m256d a = _mm256_loadu_pd(y + j), b = _mm256_loadu_pd(y + j + 4); /* a NaN: the second operand */
        x0 = _mm256_max_pd(a, x0);
        x1 = _mm256_max_pd(b, x1);
        n0 = _mm256_min_pd(a, n0);
        n1 = _mm256_min_pd(b, n1);
    }
    _mm256_storeu_pd(gx, x0);
    _mm256_storeu_pd(gx + 4, x1);
    _mm256_storeu_pd(gn, n0);
    _mm256_storeu_pd(gn + 4, n1);
}

PD_C2 static void v2_sums(const double *d, const double *e, npy_intp n8, double *s, double *dmin)
{
    __m256d z = _mm256_setzero_pd(), S[2] = {z, z}, W[2] = {z, z}, D[2] = {z, z}, mn = _mm256_set1_pd(*dmin),
            mi = _mm256_set1_pd(-INFINITY);
    double t[4];
    npy_intp j;
    int h;
    for (j = 0; j < n8; j += 8)
        for (h = 0; h < 2; h++) {
            __m256d dv = _mm256_loadu_pd(d + j + 4 * h), ev = _mm256_loadu_pd(e + j + 4 * h);
            __m256d pos = _mm256_cmp_pd(ev, z, _CMP_GT_OQ), w = _mm256_mul_pd(ev, dv);
            S[h] = _mm256_add_pd(S[h], ev);
            W[h] = _mm256_add_pd(W[h], _mm256_and_pd(pos, w));
            D[h] = _mm256_add_pd(D[h], _mm256_and_pd(pos, _mm256_mul_pd(w, dv)));
            mn = _mm256_min_pd(_mm256_and_pd(_mm256_cmp_pd(dv, mi, _CMP_GT_OQ), dv), mn); /* -inf: 0; ties keep mn */
        }
    s[0] = v2_fold(S[0], S[1]);
    s[1] = v2_fold(W[0], W[1]);
    s[2] = v2_fold(D[0], D[1]);
    _mm256_storeu_pd(t, mn);
    *dmin = fmin(fmin(t[0], t[1]), fmin(t[2], t[3]));
}

PD_C2 static void v2_tail(const double *y, const double *d, const double *e, npy_intp n8, int beyond,
                          double t, double *s, npy_intp *ninf, npy_intp *neq)
{
    __m256d z = _mm256_setzero_pd(), E[2] = {z, z}, W[2] = {z, z}, S[2] = {z, z}, B[2] = {z, z},
            tv = _mm256_set1_pd(t), mi = _mm256_set1_pd(-INFINITY);
    npy_intp j, ni = 0, nq = 0;
    int h;
    for (j = 0; j < n8; j += 8)
        for (h = 0; h < 2; h++) {
            __m256d yv = _mm256_loadu_pd(y + j + 4 * h), dv = _mm256_loadu_pd(d + j + 4 * h),
                    ev = _mm256_loadu_pd(e + j + 4 * h);
            __m256d tm = _mm256_cmp_pd(yv, yv, _CMP_ORD_Q), fin = _mm256_cmp_pd(dv, mi, _CMP_GT_OQ);
            E[h] = _mm256_add_pd(E[h], _mm256_and_pd(tm, ev));
            W[h] = _mm256_add_pd(W[h], _mm256_and_pd(_mm256_and_pd(tm, _mm256_cmp_pd(ev, z, _CMP_GT_OQ)),
                                                     _mm256_mul_pd(ev, dv)));
            S[h] = _mm256_add_pd(S[h], _mm256_and_pd(_mm256_and_pd(tm, fin), dv));
            ni += __builtin_popcount((unsigned)_mm256_movemask_pd(_mm256_andnot_pd(fin, tm)));
            if (beyond) {
                B[h] = _mm256_add_pd(B[h], _mm256_and_pd(_mm256_cmp_pd(yv, tv, _CMP_LT_OQ), ev));
                nq += __builtin_popcount((unsigned)_mm256_movemask_pd(_mm256_cmp_pd(yv, tv, _CMP_EQ_OQ)));
            }
        }
    s[0] = v2_fold(E[0], E[1]);
    s[1] = v2_fold(W[0], W[1]);
    s[2] = v2_fold(S[0], S[1]);
    s[3] = v2_fold(B[0], B[1]);
    *ninf += ni;
    *neq += nq;
}

static const pd_cmp_ops pd_cmp_avx2 = {v2_stats, v2_next_out, v2_groups, v2_sums, v2_tail};

/* ---- AVX-512: the 8 lanes in one __m512d; the same operations in the same order (no FMA) */
#define PD_C5 __attribute__((target("avx512f,avx512dq,avx2")))

PD_C5 static double v5_fold(__m512d a) /* pd_fold's order */
{
    __m256d s = _mm256_add_pd(_mm512_castpd512_pd256(a), _mm512_extractf64x4_pd(a, 1));
    __m128d t = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    return _mm_cvtsd_f64(_mm_add_sd(t, _mm_unpackhi_pd(t, t)));
}

PD_C5 static int v5_stats(const double *y, npy_intp n8, double y0, double *mx, npy_intp *rank)
{
    __m512d m = _mm512_set1_pd(-INFINITY), z = _mm512_set1_pd(y0), inf = _mm512_set1_pd(INFINITY);
    __mmask8 bad = 0;
    npy_intp j, nr = 0;
    for (j = 0; j < n8; j += 8) {
        __m512d v = _mm512_loadu_pd(y + j);
        bad |= _mm512_cmp_pd_mask(v, inf, _CMP_NLT_UQ);
        m = _mm512_max_pd(m, v);
        nr += __builtin_popcount(_mm512_cmp_pd_mask(v, z, _CMP_GT_OQ));
    }
    if (bad)
        return 1;
    *mx = fmax(*mx, _mm512_reduce_max_pd(m));
    *rank += nr;
    return 0;
}

PD_C5 static npy_intp v5_next_out(const double *y, npy_intp j, npy_intp n8, double hi, double lo)
{
    __m512d h = _mm512_set1_pd(hi), l = _mm512_set1_pd(lo);
    npy_intp b = j & ~(npy_intp)7;
    unsigned skip = (1u << (j - b)) - 1; /* the block's values before j */
    for (; b < n8; b += 8, skip = 0) {
        __m512d v = _mm512_loadu_pd(y + b);
        unsigned k = (_mm512_cmp_pd_mask(v, h, _CMP_GT_OQ) | _mm512_cmp_pd_mask(v, l, _CMP_LT_OQ)) & ~skip;
        if (k)
            return b + __builtin_ctz(k);
    }
    return n8;
}

PD_C5 static void v5_groups(const double *y, npy_intp n8, double *gx, double *gn)
{
    __m512d mx = _mm512_set1_pd(-INFINITY), mn = _mm512_set1_pd(INFINITY);
    npy_intp j;
    for (j = 0; j < n8; j += 8) {
        __m512d v = _mm512_loadu_pd(y + j); /* a NaN v: the second operand */
        mx = _mm512_max_pd(v, mx);
        mn = _mm512_min_pd(v, mn);
    }
    _mm512_storeu_pd(gx, mx);
    _mm512_storeu_pd(gn, mn);
}

PD_C5 static void v5_sums(const double *d, const double *e, npy_intp n8, double *s, double *dmin)
{
    __m512d S = _mm512_setzero_pd(), W = S, D = S, mn = _mm512_set1_pd(*dmin), zero = S,
            ninf = _mm512_set1_pd(-INFINITY);
    npy_intp j;
    for (j = 0; j < n8; j += 8) {
        __m512d dv = _mm512_loadu_pd(d + j), ev = _mm512_loadu_pd(e + j), w = _mm512_mul_pd(ev, dv);
        __mmask8 pos = _mm512_cmp_pd_mask(ev, zero, _CMP_GT_OQ);
        S = _mm512_add_pd(S, ev);
        W = _mm512_mask_add_pd(W, pos, W, w);
        D = _mm512_mask_add_pd(D, pos, D, _mm512_mul_pd(w, dv));
        mn = _mm512_mask_min_pd(mn, _mm512_cmp_pd_mask(dv, ninf, _CMP_GT_OQ), dv, mn); /* ties keep mn */
    }
    s[0] = v5_fold(S);
    s[1] = v5_fold(W);
    s[2] = v5_fold(D);
    *dmin = _mm512_reduce_min_pd(mn);
}

PD_C5 static void v5_tail(const double *y, const double *d, const double *e, npy_intp n8, int beyond,
                          double t, double *s, npy_intp *ninf, npy_intp *neq)
{
    __m512d E = _mm512_setzero_pd(), W = E, S = E, B = E, zero = E, tv = _mm512_set1_pd(t),
            mi = _mm512_set1_pd(-INFINITY);
    npy_intp j, ni = 0, nq = 0;
    for (j = 0; j < n8; j += 8) {
        __m512d yv = _mm512_loadu_pd(y + j), dv = _mm512_loadu_pd(d + j), ev = _mm512_loadu_pd(e + j);
        __mmask8 tm = _mm512_cmp_pd_mask(yv, yv, _CMP_ORD_Q), fin;
        E = _mm512_mask_add_pd(E, tm, E, ev);
        W = _mm512_mask_add_pd(W, tm & _mm512_cmp_pd_mask(ev, zero, _CMP_GT_OQ), W, _mm512_mul_pd(ev, dv));
        fin = tm & _mm512_cmp_pd_mask(dv, mi, _CMP_GT_OQ);
        S = _mm512_mask_add_pd(S, fin, S, dv);
        ni += __builtin_popcount(tm & ~fin);
        if (beyond) {
            B = _mm512_mask_add_pd(B, _mm512_cmp_pd_mask(yv, tv, _CMP_LT_OQ), B, ev);
            nq += __builtin_popcount(_mm512_cmp_pd_mask(yv, tv, _CMP_EQ_OQ));
        }
    }
    s[0] = v5_fold(E);
    s[1] = v5_fold(W);
    s[2] = v5_fold(S);
    s[3] = v5_fold(B);
    *ninf += ni;
    *neq += nq;
}

static const pd_cmp_ops pd_cmp_avx512 = {v5_stats, v5_next_out, v5_groups, v5_sums, v5_tail};
#endif

typedef struct {
    const pd_cmp_ops *ops;
    const pd_mat *a;
    const int32_t *ids, *pids;
    npy_intp K, P, M, cap, nch;
    const pd_compare_out *out;
    pd_isa isa;        /* the exps' path (the same bits on every one) */
    double *y, *e, *d; /* PD_CCH each */
    pd_cand *ct, *cb;    /* cap each: top and bottom candidates */
    npy_intp *sid;     /* K: the valid stored ids, sorted, distinct */
    npy_intp nu;       /* their number */
    pd_cand *gt, *gb;  /* nch PD_CG each: the groups' maxima and (negated) minima */
} pd_cmp_ctx;

/* the stored ids in the chunk at c0 (*si: the first not below c0) and the padding as NaN */
static void pd_cmp_mask(pd_cmp_ctx *x, npy_intp c0, npy_intp len, npy_intp *si)
{
    npy_intp j;
    for (; *si < x->nu && x->sid[*si] < c0 + len; ++*si)
        x->y[x->sid[*si] - c0] = NAN;
    for (j = len; j & 7; j++)
        x->y[j] = NAN;
}

/* one tail value into the lists: above a full list's threshold, or any value while not full */
static inline void pd_cmp_take(const pd_cmp_ctx *x, pd_best *top, pd_best *bot, double v, npy_intp id)
{
    if (v > top->thr || (!top->full && v == v))
        pd_best_push(top, x->M, x->cap, v, id);
    if (-v > bot->thr || (!bot->full && v == v))
        pd_best_push(bot, x->M, x->cap, -v, id);
}

/* row[c0 .. c0 + PD_CCH) (or to the row's end) as float64 into b, padded with pad to a multiple
 * of 8; returns the number of values */
static npy_intp pd_cmp_load(const pd_cmp_ctx *x, const char *row, npy_intp c0, double *b, double pad)
{
    npy_intp len = x->a->V - c0 < PD_CCH ? x->a->V - c0 : PD_CCH, j;
    pd_load_many(x->isa, x->a->dt, row + c0 * pd_itemsize[x->a->dt], len, b);
    for (j = len; j & 7; j++)
        b[j] = pad;
    return len;
}

static int pd_cmp_row(pd_cmp_ctx *x, npy_intp r)
{
    const pd_mat *a = x->a;
    const pd_compare_out *o = x->out;
    const pd_cmp_ops *ops = x->ops;
    const char *row = a->base + r * a->rstride;
    const int32_t *ids = x->ids + r * x->K;
    npy_intp V = a->V, K = x->K, M = x->M, nu = 0, am = 0, rank = 0, ninf = 0, neq = 0, used = 0;
    npy_intp c, j, i, si, nT, mt, mb, ngt = 0, ngb = 0;
    double m = -INFINITY, y0, *y = x->y, *e = x->e, *d = x->d, dmin = 0.0, t = INFINITY, cs[4];
    pd_nsum S = {0, 0}, W = {0, 0}, D2 = {0, 0}, ET = {0, 0}, WT = {0, 0}, ST = {0, 0}, EB = {0, 0};
    pd_best top = {x->ct, 0, -INFINITY, 0}, bot = {x->cb, 0, -INFINITY, 0};
    double Sv, ls, c1;
    int beyond;

    for (j = 0; j < K; j++)
        if (ids[j] >= 0)
            x->sid[nu++] = ids[j];
    qsort(x->sid, (size_t)nu, sizeof(npy_intp), pd_id_cmp);
    for (i = 0, j = 0; j < nu; j++)
        if (i == 0 || x->sid[j] != x->sid[i - 1])
            x->sid[i++] = x->sid[j];
    nu = x->nu = i;
    nT = V - nu;
    y0 = pd_load(a->dt, row + (ids[0] >= 0 ? ids[0] : 0) * pd_itemsize[a->dt]);

    /* 1a: max, first argmax, validity, rank_q; the extremes of the tail's groups */
    for (c = 0, si = 0; c < x->nch; c++) {
        npy_intp c0 = c * PD_CCH, len = pd_cmp_load(x, row, c0, y, -INFINITY), n8 = (len + 7) & ~(npy_intp)7;
        double cm = -INFINITY, gx[PD_CG], gn[PD_CG];
        if (ops->stats(y, n8, y0, &cm, &rank))
            return -1;
        if (cm > m) { /* the first argmax: the first index of a new maximum */
            for (m = cm, j = 0; y[j] != cm; j++)
                ;
            am = c0 + j;
        }
        pd_cmp_mask(x, c0, len, &si);
        ops->groups(y, n8, gx, gn);
        for (i = 0; i < PD_CG; i++) {
            if (gx[i] > -INFINITY)
                x->gt[ngt] = (pd_cand){gx[i], ngt}, ngt++;
            if (gn[i] < INFINITY)
                x->gb[ngb] = (pd_cand){-gn[i], ngb}, ngb++;
        }
    }
    if (m == -INFINITY)
        return -1;
    pd_best_prime(&top, x->gt, ngt, M);
    pd_best_prime(&bot, x->gb, ngb, M);

    /* 1b: the tail's M largest and M smallest */
    for (c = 0, si = 0; c < x->nch; c++) {
        npy_intp c0 = c * PD_CCH, len = pd_cmp_load(x, row, c0, y, NAN), n8 = (len + 7) & ~(npy_intp)7;
        pd_cmp_mask(x, c0, len, &si);
        for (j = 0; j < len && !(top.full && bot.full); j++) /* a list takes every value until full */
            pd_cmp_take(x, &top, &bot, y[j], c0 + j);
        while ((j = ops->next_out(y, j, n8, top.thr, -bot.thr)) < n8) {
            pd_cmp_take(x, &top, &bot, y[j], c0 + j);
            j++;
        }
    }
    m += 0.0; /* -0 as +0, whichever of the two a path's max kept */
    mt = top.n < M ? top.n : M;
    mb = bot.n < M ? bot.n : M;
    if (top.n > M) /* the M best, then their order */
        pd_select(top.c, top.n, M);
    if (bot.n > M)
        pd_select(bot.c, bot.n, M);
    qsort(top.c, (size_t)mt, sizeof(pd_cand), pd_cand_cmp);
    qsort(bot.c, (size_t)mb, sizeof(pd_cand), pd_cand_cmp);
    beyond = nT > M;
    if (beyond) {
        t = top.c[M - 1].v;
        for (i = 0; i < M; i++)
            used += top.c[i].v == t;
    }

    /* 2: exps, the row's sums, the tail's sums (the stored ids and the padding as NaN) */
    for (c = 0, si = 0; c < x->nch; c++) {
        npy_intp c0 = c * PD_CCH, len = pd_cmp_load(x, row, c0, y, -INFINITY), n8 = (len + 7) & ~(npy_intp)7;
        int has_am = am >= c0 && am < c0 + len;
        if (has_am)
            y[am - c0] = -INFINITY; /* its e = 1 is left out of S' */
        for (j = 0; j < n8; j++)
            d[j] = y[j] - m;
        pd_exp_many(x->isa, d, e, n8);
        ops->sums(d, e, n8, cs, &dmin);
        pd_nsum_add(&S, cs[0]);
        pd_nsum_add(&W, cs[1]);
        pd_nsum_add(&D2, cs[2]);
        if (has_am) {
            y[am - c0] = m;
            d[am - c0] = 0.0;
            e[am - c0] = 1.0;
        }
        pd_cmp_mask(x, c0, len, &si);
        ops->tail(y, d, e, n8, beyond, t, cs, &ninf, &neq);
        pd_nsum_add(&ET, cs[0]);
        pd_nsum_add(&WT, cs[1]);
        pd_nsum_add(&ST, cs[2]);
        pd_nsum_add(&EB, cs[3]);
    }
    if (beyond && neq > used) {
        double dt = t - m, et;
        pd_exp_many(x->isa, &dt, &et, 1);
        pd_nsum_add(&EB, (double)(neq - used) * et);
    }

    Sv = S.s + S.c;
    ls = log1p(Sv);
    Sv = 1.0 + Sv;
    c1 = 1.0 + ls;
    o->HQ[r] = ls - (W.s + W.c) / Sv;
    o->zq[r] = (c1 * c1 - 2.0 * c1 * ((W.s + W.c) / Sv)) + (D2.s + D2.c) / Sv;
    o->bmax[r] = -(dmin - ls);
    o->nT[r] = nT;
    o->ninfT[r] = ninf;
    o->QT[r] = (ET.s + ET.c) / Sv;
    o->sbT[r] = (ST.s + ST.c) - (double)(nT - ninf) * ls;
    o->qbT[r] = ((WT.s + WT.c) - ls * (ET.s + ET.c)) / Sv;
    o->Qbeyond[r] = beyond ? (EB.s + EB.c) / Sv : 0.0;
    o->argmax_q[r] = am;
    o->rank_q[r] = rank;
    for (i = 0; i < M; i++) {
        o->top[r * M + i] = i < mt ? (top.c[i].v - m) - ls : -INFINITY;
        o->bot[r * M + i] = i < mb ? (-bot.c[i].v - m) - ls : INFINITY;
    }
    for (j = 0; j < K; j++)
        o->bS[r * K + j] = ids[j] >= 0 ? (pd_load(a->dt, row + ids[j] * pd_itemsize[a->dt]) - m) - ls : NAN;
    for (j = 0; x->pids && j < x->P; j++) {
        int32_t p = x->pids[r * x->P + j];
        o->bP[r * x->P + j] = p >= 0 ? (pd_load(a->dt, row + p * pd_itemsize[a->dt]) - m) - ls : NAN;
    }
    return 0;
}

/* One share of rows (pd_run_rows): its own copy of the context, with its own buffers. */
static void pd_cmp_rows(void *ctx, npy_intp r0, npy_intp r1, npy_intp *bad_row, int *bad_kind)
{
    pd_cmp_ctx xs = *(const pd_cmp_ctx *)ctx, *x = &xs;
    npy_intp r;
    if (r0 >= r1)
        return;
    x->y = malloc(3 * PD_CCH * sizeof(double));
    x->ct = malloc(2 * (size_t)x->cap * sizeof(pd_cand));
    x->sid = malloc((size_t)x->K * sizeof(npy_intp));
    x->gt = malloc(2 * (size_t)x->nch * PD_CG * sizeof(pd_cand));
    if (!x->y || !x->ct || !x->sid || !x->gt) {
        *bad_row = r0;
        *bad_kind = 3;
    }
    else {
        x->e = x->y + PD_CCH;
        x->d = x->y + 2 * PD_CCH;
        x->cb = x->ct + x->cap;
        x->gb = x->gt + x->nch * PD_CG;
        for (r = r0; r < r1; r++)
            if (pd_cmp_row(x, r) < 0) {
                *bad_row = r;
                *bad_kind = 2;
                break;
            }
    }
    free(x->y);
    free(x->ct);
    free(x->sid);
    free(x->gt);
}

int pd_compare_run(pd_isa isa, const pd_mat *a, const int32_t *ids, npy_intp K, const int32_t *pids,
                   npy_intp P, npy_intp M, int threads, const pd_compare_out *out,
                   npy_intp *bad_row, int *bad_kind)
{
    pd_cmp_ctx x;
    memset(&x, 0, sizeof x);
    x.isa = isa;
    x.ops = &pd_cmp_scalar;
#ifdef PD_X86
    if (isa == PD_ISA_AVX512)
        x.ops = &pd_cmp_avx512;
    else if (isa == PD_ISA_AVX2)
        x.ops = &pd_cmp_avx2;
#endif
    x.a = a;
    x.ids = ids;
    x.pids = pids;
    x.K = K;
    x.P = P;
    x.M = M;
    x.cap = M + (M > 256 ? M : 256);
    x.nch = (a->V + PD_CCH - 1) / PD_CCH;
    x.out = out;
    return pd_run_rows(pd_cmp_rows, &x, a->rows, threads, bad_row, bad_kind);
}
