/* Stage 1 of refstats.compare (docs/architecture.md, "The compare kernel"): from a quantized
 * model's logits row y (length V) and the stored ids S of its reference record, the O(K + M)
 * values that refstats.finish needs, in two reads of the row, chunk by chunk (PD_CCH values
 * converted to float64 in an L1 buffer).  "Tail" T is the row minus the valid stored ids (ids
 * >= 0, any order, duplicates counted once); with d = y - max, S = sum e^d and ls = log S,
 * b = d - ls is the log-softmax and q = e^d / S.
 *
 *   1. max, first argmax, NaN / +inf check, rank_q = #{y > y[ids[0]]}, and over the tail the
 *      M largest and the M smallest values by a threshold filter (a candidate buffer takes the
 *      values beyond the M-th best so far; when it is full the M best are kept and the
 *      threshold moves).  The stored ids are sorted per row and masked (NaN) in the chunk, so
 *      no tail value is ever computed as a total minus the stored ones.
 *   2. e = exp(d) (the summarize kernel's float64 exp, pd_exp_many: vectorised where the path
 *      allows, the same bits on every path), and over the whole row S' (S but the first argmax's e = 1, so that
 *      ls = log1p(S') keeps its accuracy when one token holds nearly all the mass),
 *      W = sum_{e>0} e d, D2 = sum_{e>0} e d^2, the smallest finite d; over the segments between
 *      the sorted stored ids: E_T = sum e, W_T = sum_{e>0} e d, sum of the finite d, the count of
 *      -inf, and the e of the values below the M-th largest (Qbeyond).
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
 * One portable C path but the exps (which give the same bits on every path): the same bytes on
 * every PPLDELTA_SIMD path and thread count.  Memory per thread: 3 chunk buffers, 2 (M + 256) candidates, K ids. */
#include "compare.h"
#include "summarize.h"
#include <stdlib.h>

#define PD_CCH 1024 /* values per chunk (a multiple of 8) */

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
    if (!b->full && b->n == M) {
        b->full = 1;
        for (b->thr = b->c[0].v, i = 1; i < M; i++)
            b->thr = b->c[i].v < b->thr ? b->c[i].v : b->thr;
    }
    else if (b->n == cap) {
        qsort(b->c, (size_t)b->n, sizeof(pd_cand), pd_cand_cmp);
        b->n = M;
        b->thr = b->c[M - 1].v;
    }
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

static inline double pd_fold(double *l)
{
    double s = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
    memset(l, 0, 8 * sizeof(double));
    return s;
}

typedef struct {
    const pd_mat *a;
    const int32_t *ids, *pids;
    npy_intp K, P, M, cap, nch;
    const pd_compare_out *out;
    pd_isa isa;        /* the exps' path (the same bits on every one) */
    double *y, *e, *d; /* PD_CCH each */
    pd_cand *ct, *cb;    /* cap each: top and bottom candidates */
    npy_intp *sid;     /* K: the valid stored ids, sorted, distinct */
} pd_cmp_ctx;

static npy_intp pd_cmp_load(const pd_cmp_ctx *x, const char *row, npy_intp c0, double *b)
{
    npy_intp len = x->a->V - c0 < PD_CCH ? x->a->V - c0 : PD_CCH, j;
    const char *p = row + c0 * pd_itemsize[x->a->dt];
    switch (x->a->dt) {
    case PD_F64: memcpy(b, p, (size_t)len * sizeof(double)); break;
    case PD_F32: for (j = 0; j < len; j++) b[j] = pd_load_f32(p + 4 * j); break;
    case PD_F16: for (j = 0; j < len; j++) b[j] = pd_load_f16(p + 2 * j); break;
    default: for (j = 0; j < len; j++) b[j] = pd_load_bf16(p + 2 * j); break;
    }
    return len;
}

static int pd_cmp_row(pd_cmp_ctx *x, npy_intp r)
{
    const pd_mat *a = x->a;
    const pd_compare_out *o = x->out;
    const char *row = a->base + r * a->rstride;
    const int32_t *ids = x->ids + r * x->K;
    npy_intp V = a->V, K = x->K, M = x->M, nu = 0, am = 0, rank = 0, ninf = 0, neq = 0, used = 0;
    npy_intp c, j, i, si, nT, mt, mb;
    double m = -INFINITY, y0, *y = x->y, *e = x->e, *d = x->d, dmin = 0.0, t = INFINITY;
    double lS[8] = {0}, lW[8] = {0}, lD[8] = {0}, lE[8] = {0}, lWT[8] = {0}, lST[8] = {0}, lB[8] = {0};
    pd_nsum S = {0, 0}, W = {0, 0}, D2 = {0, 0}, ET = {0, 0}, WT = {0, 0}, ST = {0, 0}, EB = {0, 0};
    pd_best top = {x->ct, 0, -INFINITY, 0}, bot = {x->cb, 0, -INFINITY, 0};
    double Sv, ls, c1;
    int bad = 0, beyond;

    for (j = 0; j < K; j++)
        if (ids[j] >= 0)
            x->sid[nu++] = ids[j];
    qsort(x->sid, (size_t)nu, sizeof(npy_intp), pd_id_cmp);
    for (i = 0, j = 0; j < nu; j++)
        if (i == 0 || x->sid[j] != x->sid[i - 1])
            x->sid[i++] = x->sid[j];
    nu = i;
    nT = V - nu;
    y0 = pd_load(a->dt, row + (ids[0] >= 0 ? ids[0] : 0) * pd_itemsize[a->dt]);

    /* 1: max, first argmax, validity, rank_q, the tail's M largest and M smallest */
    for (c = 0, si = 0; c < x->nch; c++) {
        npy_intp c0 = c * PD_CCH, len = pd_cmp_load(x, row, c0, y);
        double cm = -INFINITY, lm[8];
        npy_int64 lr[8] = {0}, lb[8] = {0};
        for (i = 0; i < 8; i++)
            lm[i] = -INFINITY;
        for (j = 0; j + 8 <= len; j += 8) /* 8 independent lanes, branch-free */
            for (i = 0; i < 8; i++) {
                double v = y[j + i];
                lb[i] |= !(v < INFINITY);
                lm[i] = v > lm[i] ? v : lm[i];
                lr[i] += v > y0;
            }
        for (; j < len; j++) {
            bad |= !(y[j] < INFINITY);
            cm = y[j] > cm ? y[j] : cm;
            rank += y[j] > y0;
        }
        for (i = 0; i < 8; i++) {
            bad |= lb[i] != 0;
            cm = lm[i] > cm ? lm[i] : cm;
            rank += lr[i];
        }
        if (bad)
            return -1;
        if (cm > m) { /* the first argmax: the first index of a new maximum */
            for (m = cm, j = 0; y[j] != cm; j++)
                ;
            am = c0 + j;
        }
        for (; si < nu && x->sid[si] < c0 + len; si++)
            y[x->sid[si] - c0] = NAN;
        for (j = 0; j < len; j++) {
            double v = y[j], w = -v;
            if (v > top.thr || (!top.full && v == v))
                pd_best_push(&top, M, x->cap, v, c0 + j);
            if (w > bot.thr || (!bot.full && w == w))
                pd_best_push(&bot, M, x->cap, w, c0 + j);
        }
    }
    if (m == -INFINITY)
        return -1;
    qsort(top.c, (size_t)top.n, sizeof(pd_cand), pd_cand_cmp);
    qsort(bot.c, (size_t)bot.n, sizeof(pd_cand), pd_cand_cmp);
    mt = top.n < M ? top.n : M;
    mb = bot.n < M ? bot.n : M;
    beyond = nT > M;
    if (beyond) {
        t = top.c[M - 1].v;
        for (i = 0; i < M; i++)
            used += top.c[i].v == t;
    }

    /* 2: exps, the row's sums, the tail's sums over the segments between the stored ids */
    for (c = 0, si = 0; c < x->nch; c++) {
        npy_intp c0 = c * PD_CCH, len = pd_cmp_load(x, row, c0, y), j0 = 0, j1;
        int has_am = am >= c0 && am < c0 + len;
        if (has_am)
            y[am - c0] = -INFINITY; /* its e = 1 is left out of S' */
        for (j = 0; j < len; j++)
            d[j] = y[j] - m;
        pd_exp_many(x->isa, d, e, len);
        for (j = 0; j < len; j++) {
            double dj = d[j], ej = e[j];
            lS[j & 7] += ej;
            if (ej > 0) {
                double w = ej * dj;
                lW[j & 7] += w;
                lD[j & 7] += w * dj;
            }
            dmin = dj > -INFINITY && dj < dmin ? dj : dmin;
        }
        if (has_am) {
            y[am - c0] = m;
            d[am - c0] = 0.0;
            e[am - c0] = 1.0;
        }
        for (; j0 < len; j0 = j1 + 1) {
            int stored = si < nu && x->sid[si] < c0 + len;
            j1 = stored ? x->sid[si++] - c0 : len;
            for (j = j0; j < j1; j++) {
                double ej = e[j], dj = d[j];
                lE[j & 7] += ej;
                if (ej > 0)
                    lWT[j & 7] += ej * dj;
                if (dj > -INFINITY)
                    lST[j & 7] += dj;
                else
                    ninf++;
                if (beyond) {
                    if (y[j] < t)
                        lB[j & 7] += ej;
                    else
                        neq += y[j] == t;
                }
            }
        }
        pd_nsum_add(&S, pd_fold(lS));
        pd_nsum_add(&W, pd_fold(lW));
        pd_nsum_add(&D2, pd_fold(lD));
        pd_nsum_add(&ET, pd_fold(lE));
        pd_nsum_add(&WT, pd_fold(lWT));
        pd_nsum_add(&ST, pd_fold(lST));
        pd_nsum_add(&EB, pd_fold(lB));
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
    if (!x->y || !x->ct || !x->sid) {
        *bad_row = r0;
        *bad_kind = 3;
    }
    else {
        x->e = x->y + PD_CCH;
        x->d = x->y + 2 * PD_CCH;
        x->cb = x->ct + x->cap;
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
}

int pd_compare_run(pd_isa isa, const pd_mat *a, const int32_t *ids, npy_intp K, const int32_t *pids,
                   npy_intp P, npy_intp M, int threads, const pd_compare_out *out,
                   npy_intp *bad_row, int *bad_kind)
{
    pd_cmp_ctx x;
    memset(&x, 0, sizeof x);
    x.isa = isa;
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
