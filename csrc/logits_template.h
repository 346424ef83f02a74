/* The logits row kernels, written once.  Each logits_<isa>.c defines, before including this:
 *   PD_TARGET, pd_f (float32 vector), PD_FW (lanes),
 *   pd_f_set1, pd_f_zero, pd_f_add, pd_f_sub, pd_f_mul, pd_f_max, pd_f_hmax, pd_f_hsum (-> double),
 *   pd_f_exp (x <= 0; about 1 ulp; -inf -> 0), pd_f_nanmask_or(acc, x) (accumulate "x is NaN"),
 *   pd_f_anynan(acc), pd_f_gt_count(x, thr) (lanes with x > thr), pd_f_pos(x) (x > 0 as mask),
 *   pd_f_and(a, mask)
 * and instantiates PD_DEFINE_LOGITS(prefix, load_vector, load_scalar, itemsize) per dtype.
 *
 * A row is processed in chunks of PD_LCHUNK values that stay in L1: a max pass, then an exp
 * pass relative to the running max (the online log-sum-exp: when a chunk raises the max, the
 * running sums are rescaled once).  So each row is read once from memory, and no temporary of
 * the row's size exists.  Sums of a chunk's exps are float32 lanes of at most PD_LCHUNK/PD_FW
 * terms, folded into float64 per chunk, so the error does not grow with the vocabulary:
 * log-probs within ~1e-6 of float64 (measured 5e-8).  KL divergence is a difference of such
 * terms: the float32 paths have an absolute floor of about 1e-7 nats (nearly identical rows);
 * the portable kernels compute in float64 (PPLDELTA_SIMD=scalar).
 *
 * kl: for rows a (P = softmax a) and b (Q = softmax b) in one pass: lse_a, lse_b,
 *   w  = sum exp(a - ma) (a - b)  so KL(P||Q) = w / sa - lse_a + lse_b,
 *   wr = sum exp(b - mb) (b - a)  so KL(Q||P) = wr / sb - lse_b + lse_a,
 * and the first argmax of each row.  Terms where exp(.) is 0 are masked (a token that both
 * models give -inf contributes nothing instead of 0 * inf = NaN).
 * Extreme rows give the same answer on every path (pd_kl_term): P_j > 0 = Q_j (a_j finite,
 * b_j = -inf) makes KL(P||Q) = +inf however small P_j is (even where exp underflows), and a
 * chunk where some |a_j - b_j| > PD_KL_BIG (or is infinite) is summed again in float64, so a
 * difference beyond the float32 range does not overflow and a term whose P_j underflows the
 * float32 exp (< e^-87.3 < 2^-125) still counts when a_j - b_j is huge.  Below PD_KL_BIG the
 * terms the float32 exp drops weigh less than 2^-125 * 2^16 each.  A KL beyond DBL_MAX is inf.
 */
#define PD_LCHUNK 1024
#define PD_KL_BIG 65536.0

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
            pd_f vm = pd_f_set1(-INFINITY), vn = pd_f_zero(), vs = pd_f_zero(), vb;           \
            PD_FT cm;                                                                         \
            double cs;                                                                        \
            for (j = 0; j + PD_FW <= len; j += PD_FW) {                                       \
                pd_f x = LOADV(p + j * (ISZ));                                                \
                vn = pd_f_nanmask_or(vn, x);                                                  \
                vm = pd_f_max(vm, x);                                                         \
            }                                                                                 \
            cm = pd_f_hmax(vm);                                                               \
            for (; j < len; j++) {                                                            \
                PD_FT x = (PD_FT)LOADS(p + j * (ISZ));                                        \
                if (x != x)                                                                   \
                    return -1;                                                                \
                if (x > cm)                                                                   \
                    cm = x;                                                                   \
            }                                                                                 \
            if (pd_f_anynan(vn) || cm == INFINITY)                                            \
                return -1;                                                                    \
            if (cm > m) {                                                                     \
                s *= exp((double)m - (double)cm);                                             \
                m = cm;                                                                       \
                for (j = 0; (PD_FT)LOADS(p + j * (ISZ)) != cm; j++)                           \
                    ;                                                                         \
                am = c0 + j;                                                                  \
            }                                                                                 \
            if (m == -INFINITY)                                                               \
                continue;                                                                     \
            vb = pd_f_set1(m);                                                                \
            for (j = 0; j + PD_FW <= len; j += PD_FW)                                         \
                vs = pd_f_add(vs, pd_f_exp(pd_f_sub(LOADV(p + j * (ISZ)), vb)));              \
            cs = pd_f_hsum(vs);                                                               \
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
            pd_f vma = pd_f_set1(-INFINITY), vmb = vma, vn = pd_f_zero();                     \
            pd_f vsa = pd_f_zero(), vsb = vsa, vw = vsa, vwr = vsa, vd = vsa, va, vb;         \
            PD_FT cma, cmb, fa, fb;                                                           \
            double csa, csb, cw, cwr;                                                         \
            for (j = 0; j + PD_FW <= len; j += PD_FW) {                                       \
                pd_f xa = LOADV(pa + j * (ISZ)), xb = LOADV(pb + j * (ISZ));                  \
                vn = pd_f_nanmask_or(pd_f_nanmask_or(vn, xa), xb);                            \
                vma = pd_f_max(vma, xa);                                                      \
                vmb = pd_f_max(vmb, xb);                                                      \
            }                                                                                 \
            cma = pd_f_hmax(vma);                                                             \
            cmb = pd_f_hmax(vmb);                                                             \
            for (; j < len; j++) {                                                            \
                PD_FT xa = (PD_FT)LOADS(pa + j * (ISZ)), xb = (PD_FT)LOADS(pb + j * (ISZ));   \
                if (xa != xa || xb != xb)                                                     \
                    return -1;                                                                \
                if (xa > cma)                                                                 \
                    cma = xa;                                                                 \
                if (xb > cmb)                                                                 \
                    cmb = xb;                                                                 \
            }                                                                                 \
            if (pd_f_anynan(vn) || cma == INFINITY || cmb == INFINITY)                        \
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
            /* a base of 0 while a row is all -inf so far: its exps are exactly 0 */         \
            fa = ma == -INFINITY ? 0 : ma;                                                    \
            fb = mb == -INFINITY ? 0 : mb;                                                    \
            va = pd_f_set1(fa);                                                               \
            vb = pd_f_set1(fb);                                                               \
            for (j = 0; j + PD_FW <= len; j += PD_FW) {                                       \
                pd_f xa = LOADV(pa + j * (ISZ)), xb = LOADV(pb + j * (ISZ));                  \
                pd_f ea = pd_f_exp(pd_f_sub(xa, va)), eb = pd_f_exp(pd_f_sub(xb, vb));        \
                pd_f dab = pd_f_sub(xa, xb);                                                  \
                vsa = pd_f_add(vsa, ea);                                                      \
                vsb = pd_f_add(vsb, eb);                                                      \
                vw = pd_f_add(vw, pd_f_and(pd_f_mul(ea, dab), pd_f_pos(ea)));                 \
                vwr = pd_f_sub(vwr, pd_f_and(pd_f_mul(eb, dab), pd_f_pos(eb)));               \
                vd = pd_f_max(pd_f_max(dab, pd_f_sub(pd_f_zero(), dab)), vd); /* NaN: skip */ \
            }                                                                                 \
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
