/* The logits row kernels, written once.  Each logits_<isa>.c defines, before including this:
 *   PD_TARGET, pd_f (float32 vector), PD_FW (lanes),
 *   pd_f_set1, pd_f_zero, pd_f_add, pd_f_sub, pd_f_mul, pd_f_max, pd_f_hmax, pd_f_hsum (-> double),
 *   pd_f_exp (x <= 0, see exp_poly.h; it may return a non-finite value for NaN, -inf or x far
 *   below 0: a chunk whose sums come out non-finite is summed again with pd_f_exp0, which names
 *   the NaN), pd_f_nanmask_or(acc, x) (accumulate "x is NaN"),
 *   pd_f_anynan(acc), pd_f_gt_count(x, thr) (lanes with x > thr), pd_f_pos(x) (x > 0 as mask),
 *   pd_f_and(a, mask)
 * and may define pd_f_min, pd_f_fma(a, b, c) (a b + c), pd_f_exp0 (an exp that is exactly 0
 * below e^-87.3, where pd_f_exp is not) and PD_EXP_NAN (pd_f_exp(NaN) is NaN, so a NaN logit
 * shows in the sum of the exps and the max pass need not look for it); then it instantiates
 * PD_DEFINE_LOGITS(prefix, load_vector, load_scalar, itemsize) per dtype.
 *
 * A row is processed in chunks of PD_LCHUNK values that stay in L1: a max pass (4 independent
 * maxima, so it runs at load speed), then one pass that computes one exp per element and
 * everything that needs it, relative to the running max (the online log-sum-exp: when a chunk
 * raises the max, the running sums are rescaled once).  So each row is read once from memory,
 * and no temporary of the row's size exists.  Sums of a chunk's exps are float32 lanes of at
 * most PD_LCHUNK/PD_FW terms, folded into float64 per chunk, so the error does not grow with the
 * vocabulary: the error budget is in exp_poly.h (log-probs within 4.6e-6 of float64, measured
 * 1e-7, unbiased to 2e-9).  lse and kl sum a row's exps in the same order with the same exp, so
 * their log-probs agree bit for bit (except in kl's float64 chunks, below).  KL divergence is a
 * difference of such terms: the
 * float32 paths have an absolute floor of about 1e-7 nats (nearly identical rows); the portable
 * kernels compute in float64 (PPLDELTA_SIMD=scalar).
 *
 * kl: for rows a (P = softmax a) and b (Q = softmax b) in one pass: lse_a, lse_b,
 *   w  = sum exp(a - ma) (a - b)  so KL(P||Q) = w / sa - lse_a + lse_b,
 *   wr = sum exp(b - mb) (b - a)  so KL(Q||P) = wr / sb - lse_b + lse_a,
 * and the first argmax of each row.  The fast path takes a chunk whose logits are all finite
 * with every |a_j - b_j| <= PD_KL_BIG (known from the max pass, which also takes the minima:
 * max a - min b and max b - min a bound every difference) and no NaN (a NaN makes the chunk's
 * sums NaN: the chunk goes to the careful path, which names it); there every term is finite and
 * no mask is needed.  The careful path masks terms where exp(.) is 0 (a token that both models
 * give -inf contributes nothing instead of 0 * inf = NaN), and extreme rows give the same answer
 * on every path (pd_kl_term): P_j > 0 = Q_j (a_j finite, b_j = -inf) makes KL(P||Q) = +inf
 * however small P_j is (even where exp underflows), and a chunk where some |a_j - b_j| >
 * PD_KL_BIG (or is infinite) is summed again in float64, so a difference beyond the float32
 * range does not overflow and a term whose P_j underflows the float32 exp (< e^-87.3 < 2^-125)
 * still counts when a_j - b_j is huge.  Below PD_KL_BIG the terms the float32 exp drops weigh
 * less than 2^-125 * 2^16 each.  A KL beyond DBL_MAX is inf.
 */
#define PD_LCHUNK 1024
#define PD_KL_BIG 65536.0

#ifndef pd_f_fma
#define pd_f_fma(a, b, c) pd_f_add(pd_f_mul(a, b), c)
#endif
#ifndef pd_f_min
#define pd_f_min(a, b) pd_f_sub(pd_f_zero(), pd_f_max(pd_f_sub(pd_f_zero(), a), pd_f_sub(pd_f_zero(), b)))
#endif
#ifndef pd_f_exp0
#define pd_f_exp0(x) pd_f_exp(x)
#endif
#ifdef PD_EXP_NAN
#define PD_NAN_OR(acc, x) (acc)
#else
#define PD_NAN_OR(acc, x) pd_f_nanmask_or(acc, x)
#endif
#define pd_f_hmin(v) (-pd_f_hmax(pd_f_sub(pd_f_zero(), v)))
/* The exp pass of a chunk runs from L1: meanwhile it asks for the next chunk's lines (one per
 * vector, clamped to the row), so memory streams while the exps are computed. */
#if defined(__GNUC__)
#define PD_PREFETCH(p) __builtin_prefetch(p, 0, 3)
#else
#define PD_PREFETCH(p) ((void)(p))
#endif
#define PD_NEXT(row, c0, j, V, ISZ) ((row) + ((c0) + PD_LCHUNK + (j) < (V) ? (c0) + PD_LCHUNK + (j) : (V) - 1) * (ISZ))

/* One token's term P_j (x - y) of KL, P_j = e (relative to the running max): see above. */
static inline double pd_kl_term(double e, double x, double y)
{
    if (y == -INFINITY)
        return x == -INFINITY ? 0.0 : INFINITY;
    return e > 0 ? e * (x - y) : 0.0;
}

#define PD_DEFINE_LOGITS(NAME, LOADV, LOADS, ISZ)                                             \
    PD_TARGET static int NAME##_lse(const char *row, npy_intp V, double *lse,                 \
                                    npy_intp *argmax)                                         \
    {                                                                                         \
        PD_FT m = -INFINITY;                                                                  \
        double s = 0.0;                                                                       \
        npy_intp c0, am = 0;                                                                  \
        for (c0 = 0; c0 < V; c0 += PD_LCHUNK) {                                               \
            npy_intp len = V - c0 < PD_LCHUNK ? V - c0 : PD_LCHUNK, j;                        \
            const char *p = row + c0 * (ISZ);                                                 \
            pd_f v0 = pd_f_set1(-INFINITY), v1 = v0, v2 = v0, v3 = v0, vn = pd_f_zero();      \
            pd_f vs = pd_f_zero(), vb;                                                        \
            PD_FT cm;                                                                         \
            double cs;                                                                        \
            for (j = 0; j + 4 * PD_FW <= len; j += 4 * PD_FW) {                               \
                pd_f x0 = LOADV(p + j * (ISZ)), x1 = LOADV(p + (j + PD_FW) * (ISZ));          \
                pd_f x2 = LOADV(p + (j + 2 * PD_FW) * (ISZ));                                 \
                pd_f x3 = LOADV(p + (j + 3 * PD_FW) * (ISZ));                                 \
                vn = PD_NAN_OR(PD_NAN_OR(PD_NAN_OR(PD_NAN_OR(vn, x0), x1), x2), x3);          \
                v0 = pd_f_max(v0, x0);                                                        \
                v1 = pd_f_max(v1, x1);                                                        \
                v2 = pd_f_max(v2, x2);                                                        \
                v3 = pd_f_max(v3, x3);                                                        \
            }                                                                                 \
            for (; j + PD_FW <= len; j += PD_FW) {                                            \
                pd_f x = LOADV(p + j * (ISZ));                                                \
                vn = PD_NAN_OR(vn, x);                                                        \
                v0 = pd_f_max(v0, x);                                                         \
            }                                                                                 \
            cm = pd_f_hmax(pd_f_max(pd_f_max(v0, v1), pd_f_max(v2, v3)));                     \
            for (; j < len; j++) {                                                            \
                PD_FT x = (PD_FT)LOADS(p + j * (ISZ));                                        \
                if (x != x)                                                                   \
                    return -1;                                                                \
                if (x > cm)                                                                   \
                    cm = x;                                                                   \
            }                                                                                 \
            if (pd_f_anynan(vn) || cm != cm || cm == INFINITY)                                \
                return -1;                                                                    \
            if (cm > m) {                                                                     \
                s *= exp((double)m - (double)cm);                                             \
                m = cm;                                                                       \
                for (j = 0; (PD_FT)LOADS(p + j * (ISZ)) != cm; j++)                           \
                    ;                                                                         \
                am = c0 + j;                                                                  \
            }                                                                                 \
            if (m == -INFINITY) { /* all -inf so far (or NaN: the max pass may drop it) */  \
                for (j = 0; j < len; j++)                                                     \
                    if (LOADS(p + j * (ISZ)) != LOADS(p + j * (ISZ)))                         \
                        return -1;                                                            \
                continue;                                                                     \
            }                                                                                 \
            vb = pd_f_set1(m);                                                                \
            for (j = 0; j + PD_FW <= len; j += PD_FW) { /* as NAME##_kl sums, bit for bit */  \
                PD_PREFETCH(PD_NEXT(row, c0, j, V, ISZ));                                     \
                vs = pd_f_add(vs, pd_f_exp(pd_f_sub(LOADV(p + j * (ISZ)), vb)));              \
            }                                                                                 \
            cs = pd_f_hsum(vs);                                             \
            if (!isfinite(cs)) { /* NaN, -inf or far below the max: pd_f_exp0 says which */ \
                vn = vs = pd_f_zero();                                                        \
                for (j = 0; j + PD_FW <= len; j += PD_FW) {                                   \
                    pd_f x = LOADV(p + j * (ISZ));                                            \
                    vn = pd_f_nanmask_or(vn, x);                                              \
                    vs = pd_f_add(vs, pd_f_exp0(pd_f_sub(x, vb)));                            \
                }                                                                             \
                if (pd_f_anynan(vn))                                                          \
                    return -1;                                                                \
                cs = pd_f_hsum(vs);                                                           \
            }                                                                                 \
            for (; j < len; j++)                                                              \
                cs += exp((double)(PD_FT)LOADS(p + j * (ISZ)) - (double)m);                   \
            s += cs;                                                                          \
        }                                                                                     \
        *lse = (double)m + log(s);                                                            \
        *argmax = am;                                                                         \
        return 0;                                                                             \
    }                                                                                         \
                                                                                              \
    PD_TARGET static int NAME##_kl(const char *ra, const char *rb, npy_intp V, pd_kl_row *r)  \
    {                                                                                         \
        PD_FT ma = -INFINITY, mb = -INFINITY;                                                 \
        double sa = 0.0, sb = 0.0, w = 0.0, wr = 0.0;                                         \
        npy_intp c0, ia = 0, ib = 0;                                                          \
        for (c0 = 0; c0 < V; c0 += PD_LCHUNK) {                                               \
            npy_intp len = V - c0 < PD_LCHUNK ? V - c0 : PD_LCHUNK, j;                        \
            const char *pa = ra + c0 * (ISZ), *pb = rb + c0 * (ISZ);                          \
            pd_f vma = pd_f_set1(-INFINITY), vmb = vma, vma1 = vma, vmb1 = vma;               \
            pd_f vla = pd_f_set1(INFINITY), vlb = vla, vla1 = vla, vlb1 = vla, vn = pd_f_zero();\
            pd_f vsa = pd_f_zero(), vsb = vsa, vw = vsa, vwr = vsa, vd = vsa, va, vb;         \
            PD_FT cma, cmb, cla, clb, fa, fb;                                                 \
            double csa, csb, cw, cwr;                                                         \
            for (j = 0; j + 2 * PD_FW <= len; j += 2 * PD_FW) {                               \
                pd_f xa = LOADV(pa + j * (ISZ)), xb = LOADV(pb + j * (ISZ));                  \
                pd_f ya = LOADV(pa + (j + PD_FW) * (ISZ)), yb = LOADV(pb + (j + PD_FW) * (ISZ));\
                vn = PD_NAN_OR(PD_NAN_OR(PD_NAN_OR(PD_NAN_OR(vn, xa), xb), ya), yb);          \
                vma = pd_f_max(vma, xa);                                                      \
                vmb = pd_f_max(vmb, xb);                                                      \
                vla = pd_f_min(vla, xa);                                                      \
                vlb = pd_f_min(vlb, xb);                                                      \
                vma1 = pd_f_max(vma1, ya);                                                    \
                vmb1 = pd_f_max(vmb1, yb);                                                    \
                vla1 = pd_f_min(vla1, ya);                                                    \
                vlb1 = pd_f_min(vlb1, yb);                                                    \
            }                                                                                 \
            for (; j + PD_FW <= len; j += PD_FW) {                                            \
                pd_f xa = LOADV(pa + j * (ISZ)), xb = LOADV(pb + j * (ISZ));                  \
                vn = PD_NAN_OR(PD_NAN_OR(vn, xa), xb);                                        \
                vma = pd_f_max(vma, xa);                                                      \
                vmb = pd_f_max(vmb, xb);                                                      \
                vla = pd_f_min(vla, xa);                                                      \
                vlb = pd_f_min(vlb, xb);                                                      \
            }                                                                                 \
            cma = pd_f_hmax(pd_f_max(vma, vma1));                                             \
            cmb = pd_f_hmax(pd_f_max(vmb, vmb1));                                             \
            cla = pd_f_hmin(pd_f_min(vla, vla1));                                             \
            clb = pd_f_hmin(pd_f_min(vlb, vlb1));                                             \
            for (; j < len; j++) {                                                            \
                PD_FT xa = (PD_FT)LOADS(pa + j * (ISZ)), xb = (PD_FT)LOADS(pb + j * (ISZ));   \
                if (xa != xa || xb != xb)                                                     \
                    return -1;                                                                \
                cma = xa > cma ? xa : cma;                                                    \
                cmb = xb > cmb ? xb : cmb;                                                    \
                cla = xa < cla ? xa : cla;                                                    \
                clb = xb < clb ? xb : clb;                                                    \
            }                                                                                 \
            if (pd_f_anynan(vn) || cma != cma || cmb != cmb || cma == INFINITY ||             \
                cmb == INFINITY)                                                              \
                return -1;                                                                    \
            if (cma > ma) {                                                                   \
                double f = exp((double)ma - (double)cma);                                     \
                sa *= f;                                                                      \
                w *= f;                                                                       \
                ma = cma;                                                                     \
                for (j = 0; (PD_FT)LOADS(pa + j * (ISZ)) != cma; j++)                         \
                    ;                                                                         \
                ia = c0 + j;                                                                  \
            }                                                                                 \
            if (cmb > mb) {                                                                   \
                double f = exp((double)mb - (double)cmb);                                     \
                sb *= f;                                                                      \
                wr *= f;                                                                      \
                mb = cmb;                                                                     \
                for (j = 0; (PD_FT)LOADS(pb + j * (ISZ)) != cmb; j++)                         \
                    ;                                                                         \
                ib = c0 + j;                                                                  \
            }                                                                                 \
            /* fast: all finite, every |a_j - b_j| <= PD_KL_BIG (-inf or NaN bounds fail) */ \
            if ((double)cma - (double)clb <= PD_KL_BIG && (double)cmb - (double)cla <= PD_KL_BIG) {\
                va = pd_f_set1(ma);                                                           \
                vb = pd_f_set1(mb);                                                           \
                for (j = 0; j + PD_FW <= len; j += PD_FW) {                                   \
                    pd_f xa = LOADV(pa + j * (ISZ)), xb = LOADV(pb + j * (ISZ));              \
                    PD_PREFETCH(PD_NEXT(ra, c0, j, V, ISZ));                                  \
                    PD_PREFETCH(PD_NEXT(rb, c0, j, V, ISZ));                                  \
                    pd_f ea = pd_f_exp(pd_f_sub(xa, va)), eb = pd_f_exp(pd_f_sub(xb, vb));    \
                    pd_f dab = pd_f_sub(xa, xb);                                              \
                    vsa = pd_f_add(vsa, ea);                                                  \
                    vsb = pd_f_add(vsb, eb);                                                  \
                    vw = pd_f_fma(ea, dab, vw);                                               \
                    vwr = pd_f_fma(eb, dab, vwr);                                             \
                }                                                                             \
                csa = pd_f_hsum(vsa);                                                         \
                csb = pd_f_hsum(vsb);                                                         \
                cw = pd_f_hsum(vw);                                                           \
                cwr = -pd_f_hsum(vwr);                                                        \
                for (; j < len; j++) {                                                        \
                    double xa = (PD_FT)LOADS(pa + j * (ISZ)), xb = (PD_FT)LOADS(pb + j * (ISZ));\
                    double ea = exp(xa - ma), eb = exp(xb - mb);                              \
                    csa += ea;                                                                \
                    csb += eb;                                                                \
                    cw += ea * (xa - xb);                                                     \
                    cwr += eb * (xb - xa);                                                    \
                }                                                                             \
                if (isfinite(csa + csb + cw + cwr)) {                                         \
                    sa += csa;                                                                \
                    sb += csb;                                                                \
                    w += cw;                                                                  \
                    wr += cwr;                                                                \
                    continue;                                                                 \
                }                                                                             \
                vsa = vsb = vw = vwr = pd_f_zero(); /* a NaN: the careful path names it */    \
            }                                                                                 \
            /* careful: a base of 0 while a row is all -inf so far: its exps are exactly 0 */\
            fa = ma == -INFINITY ? 0 : ma;                                                    \
            fb = mb == -INFINITY ? 0 : mb;                                                    \
            va = pd_f_set1(fa);                                                               \
            vb = pd_f_set1(fb);                                                               \
            vn = pd_f_zero();                                                                 \
            for (j = 0; j + PD_FW <= len; j += PD_FW) {                                       \
                pd_f xa = LOADV(pa + j * (ISZ)), xb = LOADV(pb + j * (ISZ));                  \
                pd_f ea = pd_f_exp0(pd_f_sub(xa, va)), eb = pd_f_exp0(pd_f_sub(xb, vb));      \
                pd_f dab = pd_f_sub(xa, xb);                                                  \
                vn = pd_f_nanmask_or(pd_f_nanmask_or(vn, xa), xb);                            \
                vsa = pd_f_add(vsa, ea);                                                      \
                vsb = pd_f_add(vsb, eb);                                                      \
                vw = pd_f_add(vw, pd_f_and(pd_f_mul(ea, dab), pd_f_pos(ea)));                 \
                vwr = pd_f_sub(vwr, pd_f_and(pd_f_mul(eb, dab), pd_f_pos(eb)));               \
                vd = pd_f_max(pd_f_max(dab, pd_f_sub(pd_f_zero(), dab)), vd); /* NaN: skip */ \
            }                                                                                 \
            if (pd_f_anynan(vn))                                                              \
                return -1;                                                                    \
            csa = pd_f_hsum(vsa);                                                             \
            csb = pd_f_hsum(vsb);                                                             \
            cw = pd_f_hsum(vw);                                                               \
            cwr = pd_f_hsum(vwr);                                                             \
            if ((double)pd_f_hmax(vd) > PD_KL_BIG) /* extreme: the whole chunk in float64 */ \
                csa = csb = cw = cwr = 0.0, j = 0;                                            \
            for (; j < len; j++) {                                                            \
                double xa = (PD_FT)LOADS(pa + j * (ISZ)), xb = (PD_FT)LOADS(pb + j * (ISZ));  \
                double ea = exp(xa - fa), eb = exp(xb - fb);                                  \
                csa += ea;                                                                    \
                csb += eb;                                                                    \
                cw += pd_kl_term(ea, xa, xb);                                                 \
                cwr += pd_kl_term(eb, xb, xa);                                                \
            }                                                                                 \
            sa += csa;                                                                        \
            sb += csb;                                                                        \
            w += cw;                                                                          \
            wr += cwr;                                                                        \
        }                                                                                     \
        r->lse_a = (double)ma + log(sa);                                                      \
        r->lse_b = (double)mb + log(sb);                                                      \
        r->kld = w / sa - r->lse_a + r->lse_b;                                                \
        r->kld_rev = wr / sb - r->lse_b + r->lse_a;                                           \
        r->argmax_a = ia;                                                                     \
        r->argmax_b = ib;                                                                     \
        return 0;                                                                             \
    }                                                                                         \
                                                                                              \
    PD_TARGET static npy_intp NAME##_count_gt(const char *row, npy_intp V, double thr)       \
    {                                                                                         \
        npy_intp j, c = 0;                                                                    \
        pd_f vt = pd_f_set1((PD_FT)thr);                                                      \
        for (j = 0; j + PD_FW <= V; j += PD_FW)                                               \
            c += pd_f_gt_count(LOADV(row + j * (ISZ)), vt);                                   \
        for (; j < V; j++)                                                                    \
            c += (PD_FT)LOADS(row + j * (ISZ)) > (PD_FT)thr;                                  \
        return c;                                                                             \
    }

#define PD_LOGITS_TABLE_ENTRY(NAME) {NAME##_lse, NAME##_kl, NAME##_count_gt}
