/* The SIMD reduction kernel, written once.  Each reduce_<isa>.c defines, before including this:
 *   PD_TARGET            function attribute enabling the ISA (per function, no global flags)
 *   pd_v, PD_W           the float64 vector type and its lane count
 *   pd_v_zero(), pd_v_set1(x), pd_v_add(a, b), pd_v_max(a, b), pd_v_hsum(v), pd_v_hmax(v)
 *   pd_v_sub(a, b), pd_v_abs(v), pd_v_store(double *, v)
 * and then instantiates PD_DEFINE_REDUCE(name, load_vector, load_scalar, step) per dtype, which
 * defines name_fast and name_exact.  load_vector(p) converts PD_W consecutive elements at p to
 * float64 (exact); step is the element stride in bytes (a constant for contiguous kernels,
 * `stride` for the strided one).
 *
 * Accuracy of the two variants:
 *  - fast: plain float64 lane sums, each block sum folded into the Neumaier accumulator.  Each
 *    lane adds at most PD_BLOCK/4 values, so |error| <= PD_FAST_ERR * sum|x| (see common.h), in
 *    practice far less.  Runs at memory bandwidth.
 *  - exact: every lane also carries the sum c of its TwoSum error terms e (Knuth: s + e is
 *    exactly the old lane sum plus x) and the sum a of their magnitudes |e|.  At the end of a
 *    block every lane sum, tail value and c is folded into the accumulator (exact but for the
 *    e3 that pd_acc_add bounds in acc->err), and what the plain additions into c may have lost
 *    is added to acc->err as well:
 *      a lane adds m <= PD_BLOCK/4 + 3 = 259 terms e_i (the scalar kernel's last partial block
 *      puts up to 3 more into lane 0), so |c - sum e_i| <= gamma_258 sum|e_i| (Higham, eq. 4.4;
 *      additions are exact in the subnormal range) and its computed a >= (1 - gamma_258)
 *      sum|e_i|, hence |c - sum e_i| <= gamma_258 / (1 - gamma_258) a < 260 u a.  The block's
 *      A = hsum of the a lanes (<= 32 nonnegative terms, depth <= 5) is >= sum a / (1 + 6u), so
 *      the block's loss is below 260 u (1 + 6u) A < 2^-44 A, and acc->err grows by
 *      pd_up(2^-44 A) (common.h: covers the rounding of the product and of the addition).
 *    Hence |exact sum - (hi + lo + lolo)| <= acc->err, which pd_acc_exact turns into a proof of
 *    the rounded result (or into the superaccumulator pass).  About three times the arithmetic
 *    of the fast variant; err is typically 2^-90 of the sum, so the proof fails only for sums
 *    built to sit on a rounding boundary.  A block whose sum or error terms are not finite (an
 *    infinite term, an overflow) is added again value by value, so pd_acc_add tells the two
 *    apart.  Plain float64 lanes are not exact even for float32 inputs: log-probs like -3e-7
 *    (low bit 2^-45) next to a lane sum of a few thousand need more than 53 bits.
 *
 * Per block of PD_BLOCK values: four independent vector sums (enough ILP to keep up with memory)
 * and a running max.  Validation costs no extra pass: NaN propagates into the block sum, values
 * above tol show up in the max (max(x, m) ignores a NaN x; the sum catches it), and only a block
 * that fails is scanned again, value by value, to name the first bad index.  Block sums go into
 * the Neumaier accumulator, so accuracy does not degrade with n.
 * Memory traffic: one read of the input, unaligned loads, nothing written.
 */
#define PD_TWOSUM(s, c, a, x)                                                                 \
    do {                                                                                      \
        pd_v t_ = pd_v_add(s, x), b_ = pd_v_sub(t_, s);                                       \
        pd_v e_ = pd_v_add(pd_v_sub(s, pd_v_sub(t_, b_)), pd_v_sub(x, b_));                   \
        c = pd_v_add(c, e_);                                                                  \
        a = pd_v_add(a, pd_v_abs(e_));                                                        \
        s = t_;                                                                               \
    } while (0)
#define PD_ACCUM(COMP, s, c, a, x)                                                            \
    do {                                                                                      \
        if (COMP)                                                                             \
            PD_TWOSUM(s, c, a, x);                                                            \
        else                                                                                  \
            s = pd_v_add(s, x);                                                               \
    } while (0)

#define PD_DEFINE_SIMD(NAME, LOADV, LOADS, ISZ, COMP)                                         \
    PD_TARGET static npy_intp NAME(const char *p, npy_intp n, npy_intp stride, double tol,    \
                                   pd_acc *acc)                                               \
    {                                                                                         \
        npy_intp base = 0;                                                                    \
        (void)stride;                                                                       \
        while (base < n) {                                                                    \
            npy_intp m = n - base < PD_BLOCK ? n - base : PD_BLOCK, j = 0;                    \
            pd_v s0 = pd_v_zero(), s1 = s0, s2 = s0, s3 = s0, c0 = s0, c1 = s0, c2 = s0,      \
                 c3 = s0, a0 = s0, a1 = s0, a2 = s0, a3 = s0, mx = pd_v_set1(-INFINITY);      \
            double tail[4 * PD_W], bs = 0.0, ablk = 0.0;                                      \
            int bad = 0, nt = 0, k;                                                           \
            for (; j + 4 * PD_W <= m; j += 4 * PD_W) {                                        \
                pd_v x0 = LOADV(p + (j + 0 * PD_W) * (ISZ));                                  \
                pd_v x1 = LOADV(p + (j + 1 * PD_W) * (ISZ));                                  \
                pd_v x2 = LOADV(p + (j + 2 * PD_W) * (ISZ));                                  \
                pd_v x3 = LOADV(p + (j + 3 * PD_W) * (ISZ));                                  \
                PD_ACCUM(COMP, s0, c0, a0, x0);                                              \
                PD_ACCUM(COMP, s1, c1, a1, x1);                                              \
                PD_ACCUM(COMP, s2, c2, a2, x2);                                              \
                PD_ACCUM(COMP, s3, c3, a3, x3);                                              \
                mx = pd_v_max(pd_v_max(pd_v_max(x0, x1), pd_v_max(x2, x3)), mx);              \
            }                                                                                 \
            for (; j + PD_W <= m; j += PD_W) {                                                \
                pd_v x = LOADV(p + j * (ISZ));                                                \
                PD_ACCUM(COMP, s0, c0, a0, x);                                                 \
                mx = pd_v_max(x, mx);                                                         \
            }                                                                                 \
            for (; j < m; j++) {                                                              \
                double x = LOADS(p + j * (ISZ));                                              \
                bad |= pd_is_bad(x, tol);                                                     \
                tail[nt++] = x;                                                               \
                bs += x;                                                                      \
            }                                                                                 \
            bs += pd_v_hsum(pd_v_add(pd_v_add(s0, s1), pd_v_add(s2, s3)));                    \
            if (bad || isnan(bs) || pd_v_hmax(mx) > tol) {                                    \
                for (j = 0; j < m; j++)                                                       \
                    if (pd_is_bad(LOADS(p + j * (ISZ)), tol))                                 \
                        return base + j;                                                      \
            }                                                                                 \
            if (COMP) /* + hsum(c): NaN when some error term is not finite */               \
                ablk = pd_v_hsum(pd_v_add(pd_v_add(a0, a1), pd_v_add(a2, a3))) +              \
                       pd_v_hsum(pd_v_add(pd_v_add(c0, c1), pd_v_add(c2, c3))) * 0.0;         \
            if (!isfinite(bs) || !isfinite(ablk)) /* an infinite term or an overflow */       \
                for (j = 0; j < m; j++)                                                       \
                    pd_acc_add(acc, LOADS(p + j * (ISZ)));                                    \
            else if (!COMP)                                                                   \
                pd_acc_add(acc, bs);                                                          \
            else {                                                                            \
                double lanes[4 * PD_W];                                                       \
                pd_v_store(lanes, s0);                                                        \
                pd_v_store(lanes + PD_W, s1);                                                 \
                pd_v_store(lanes + 2 * PD_W, s2);                                             \
                pd_v_store(lanes + 3 * PD_W, s3);                                             \
                for (k = 0; k < 4 * PD_W; k++)                                                \
                    if (lanes[k] != 0.0) /* short runs leave most lanes empty */              \
                        pd_acc_add(acc, lanes[k]);                                            \
                for (k = 0; k < nt; k++)                                                      \
                    pd_acc_add(acc, tail[k]);                                                 \
                if (ablk != 0.0) { /* else every e_i, hence every c, is 0 */                  \
                    pd_v_store(lanes, c0);                                                    \
                    pd_v_store(lanes + PD_W, c1);                                             \
                    pd_v_store(lanes + 2 * PD_W, c2);                                         \
                    pd_v_store(lanes + 3 * PD_W, c3);                                         \
                    for (k = 0; k < 4 * PD_W; k++)                                            \
                        if (lanes[k] != 0.0)                                                  \
                            pd_acc_add(acc, lanes[k]);                                        \
                    acc->err = pd_up(acc->err + 0x1p-44 * ablk);                              \
                }                                                                             \
            }                                                                                 \
            p += m * (ISZ);                                                                   \
            base += m;                                                                        \
        }                                                                                     \
        return -1;                                                                            \
    }

#define PD_DEFINE_REDUCE(NAME, LOADV, LOADS, ISZ)                                             \
    PD_DEFINE_SIMD(NAME##_fast, LOADV, LOADS, ISZ, 0)                                         \
    PD_DEFINE_SIMD(NAME##_exact, LOADV, LOADS, ISZ, 1)
