/* The reference record of a logits row (refstats.summarize; docs/reference-format.md): in two
 * reads of the row, chunk by chunk (PD_SCH values; float32 rows are read as they are where the
 * path can (AVX-512: both passes), else converted to float64 in an L1 buffer; pass 2, bound by
 * the exp, brings the next row into L2 meanwhile, for pass 1, bound by memory):
 *
 *   1. max, min, NaN check, and the top K by a threshold filter: a candidate buffer takes the
 *      values above the K-th best so far (a SIMD compare finds them); when it is full the K best
 *      are selected (quickselect) and the threshold rises.  Then the K best are sorted (value
 *      down, id up: a later equal value never beats an earlier one, so the filter is strict).
 *   2. e_i = exp(d_i), d_i = max(x_i - max, -746) (a float64 exp of our own, below) over the
 *      tail (the top ids masked to -inf), in float64 lanes: T = sum e_i, W = sum e_i d_i; with
 *      probes, the running sum R_i of the tail's e_i left to right (the format's definition),
 *      kept at the end of each block of PD_RB values (v5_runsum: without its add chain where
 *      that is exact).  Then S = T + the top K's e_i but the first argmax's, W += their e_i d_i.
 *
 * The argmax's e is exactly 1, so ls = log1p(S) keeps its relative accuracy when one token
 * holds nearly all the mass; entropy = ls - W / (1 + S) (= -sum p_i a_i with p_i = e_i / (1 + S):
 * two non-negative terms, no cancellation), lp_min = (min - max) - ls, tail = log T - ls, and
 * probe j is the first i with R_i > (j + u)/M R, u the row's offset in [0, 1) (given per row:
 * refstats.probe_offsets, a low-discrepancy sequence over the token positions; 1/2 without)
 * (the last id if none: a total so small that the threshold rounds up to it, as
 * refstats.probe_positions): the block is found from the
 * block-end sums and only that block's exps and running sum are computed again (the same exps
 * and adds, so the same values).
 *
 * Every SIMD path gives the same bits: each step of the exp is one correctly rounded operation
 * (FMA included: C's fma() on the scalar path), the lane sums have one fixed order (8 lanes by
 * index mod 8 within a chunk, folded ((0+4)+(2+6))+((1+5)+(3+7)), chunk sums added in order),
 * the running sum equals the one-add-at-a-time sum bit for bit, and a max of -0 is taken as +0.
 * Memory per thread: O(K) candidates, two chunk buffers and V / PD_RB block sums; no
 * (rows x vocab) temporary. */
#include "summarize.h"
#include <stdlib.h>

#define PD_SCH 1024          /* values per chunk (a multiple of PD_RB) */
#define PD_RB 64             /* values per block of the running sum (a multiple of 8) */
#define PD_XMIN (-746.0)     /* exp(x) rounds to 0 below this (and -inf is clamped to it) */

/* ------------------------------------------------------------------------------- exp(x), x <= 0
 * x = (16 k + j) ln2/16 + r (n = 16 k + j = round(16 x log2 e) by the 1.5 2^52 shift, whose low
 * bits then hold n; ln2/16 in two parts, the first with 33 significant bits so n ln2_hi is exact),
 * exp(x) = 2^k 2^(j/16) exp(r): a table of the 16 2^(j/16) (each rounded to nearest), exp(r) by
 * its Taylor polynomial of degree 7 (|r| <= ln2/32: truncation below 2^-59), 2^k at the end with
 * one rounding (results below 2^-1022 round once into the subnormals: on AVX-512 vscalefpd, on
 * the others two factors, the first exact).  Every step is one correctly rounded operation (FMA:
 * C's fma() on the scalar path, which the hardware's FMA matches bit for bit), so every path
 * gives the same bits; error at most 2.5 ulp (table 0.5, polynomial and rounding 1.5, the
 * product 0.5; the error model allows 16). */
#define PD_SHIFT 0x1.8p52
#define PD_SHIFT_BITS UINT64_C(0x4338000000000000)
#define PD_L16 0x1.71547652b82fep+4 /* 16 log2 e */
#define PD_LN2HI 0x1.62e42fee00000p-5 /* ln2/16 = PD_LN2HI + PD_LN2LO */
#define PD_LN2LO 0x1.a39ef35793c76p-37
static const double pd_ec[8] = {
    0x1.0000000000000p+0, 0x1.0000000000000p+0, 0x1.0000000000000p-1, 0x1.5555555555555p-3,
    0x1.5555555555555p-5, 0x1.1111111111111p-7, 0x1.6c16c16c16c17p-10, 0x1.a01a01a01a01ap-13};
static const double pd_e2[16] = { /* 2^(j/16) */
    0x1.0000000000000p+0, 0x1.0b5586cf9890fp+0, 0x1.172b83c7d517bp+0, 0x1.2387a6e756238p+0,
    0x1.306fe0a31b715p+0, 0x1.3dea64c123422p+0, 0x1.4bfdad5362a27p+0, 0x1.5ab07dd485429p+0,
    0x1.6a09e667f3bcdp+0, 0x1.7a11473eb0187p+0, 0x1.8ace5422aa0dbp+0, 0x1.9c49182a3f090p+0,
    0x1.ae89f995ad3adp+0, 0x1.c199bdd85529cp+0, 0x1.d5818dcfba487p+0, 0x1.ea4afa2a490dap+0};

static inline double pd_bits_d(uint64_t u) { double d; memcpy(&d, &u, sizeof d); return d; }

static inline double pd_expd(double x)
{
    double t, n, r, p;
    uint64_t u;
    int64_t k, h;
    int i;
    x = x < PD_XMIN ? PD_XMIN : x;
    t = fma(x, PD_L16, PD_SHIFT);
    n = t - PD_SHIFT;
    r = fma(-n, PD_LN2HI, x);
    r = fma(-n, PD_LN2LO, r);
    p = pd_ec[7];
    for (i = 6; i >= 0; i--)
        p = fma(p, r, pd_ec[i]);
    memcpy(&u, &t, sizeof u);
    p = p * pd_e2[u & 15];
    k = (int64_t)(u >> 4) - (int64_t)(PD_SHIFT_BITS >> 4); /* floor(n / 16), in [-1077, 0] */
    h = (k + 2048) >> 1;                                    /* floor(k / 2) + 1024 */
    p = p * pd_bits_d((uint64_t)(h - 1) << 52);
    return p * pd_bits_d((uint64_t)(k + 2047 - h) << 52);
}

static inline double pd_fold8(const double *a)
{
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

/* ------------------------------------------------------------------------------- kernels
 * Over an L1 buffer p of n8 values (a multiple of 8): */
typedef struct {
    /* max and min (returns 1 if a value is NaN) */
    int (*minmax)(const double *p, npy_intp n8, double *mx, double *mn);
    /* the first index >= j whose value exceeds thr, or n8 */
    npy_intp (*next_gt)(const double *p, npy_intp j, npy_intp n8, double thr);
    /* e = exp(d) into e, d = max(p - m, PD_XMIN); *s = sum e, *w = sum e d (8 lanes, e d added
     * by FMA, pd_fold8); with run, also the running sum *run += e[0] + e[1] + ... left to right,
     * its value at the end of each block of PD_RB values into out (sc_runsum); pf (or NULL): the
     * next row's pfn bytes to bring into L2 meanwhile, a line per 8 values (this loop is compute
     * bound, the next row's first pass memory bound) */
    void (*expsum)(const double *p, npy_intp n8, double m, double *e, double *s, double *w,
                   double *run, double *out, const char *pf, npy_intp pfn);
    /* minmax and next_gt on len float32 values as they are (NULL: through load) */
    int (*minmax32)(const char *p, npy_intp len, double *mx, double *mn);
    npy_intp (*next_gt32)(const char *p, npy_intp j, npy_intp len, double thr);
    void (*load)(pd_dtype dt, const char *p, npy_intp len, double *b); /* row values as float64 */
    /* expsum on float32 values as they are, with the top ids masked (NULL: through load) */
    void (*expsum32)(const char *p, npy_intp len, const npy_intp *top, npy_intp nt, double m, double *e,
                     double *s, double *w, double *run, double *out, const char *pf, npy_intp pfn);
} pd_sm_ops;

static int sc_minmax(const double *p, npy_intp n8, double *mx, double *mn)
{
    double a = -INFINITY, b = INFINITY;
    int nan = 0;
    npy_intp j;
    for (j = 0; j < n8; j++) {
        nan |= p[j] != p[j];
        a = p[j] > a ? p[j] : a;
        b = p[j] < b ? p[j] : b;
    }
    *mx = a;
    *mn = b;
    return nan;
}

static npy_intp sc_next_gt(const double *p, npy_intp j, npy_intp n8, double thr)
{
    while (j < n8 && !(p[j] > thr))
        j++;
    return j;
}

static double sc_runsum(const double *p, npy_intp n, double r, double *out);

static void sc_expsum(const double *p, npy_intp n8, double m, double *e, double *s, double *w,
                      double *run, double *out, const char *pf, npy_intp pfn)
{
    double as[8] = {0}, aw[8] = {0};
    npy_intp j;
    (void)pf;
    (void)pfn;
    for (j = 0; j < n8; j++) {
        double d = p[j] - m, v;
        d = d < PD_XMIN ? PD_XMIN : d;
        v = pd_expd(d);
        e[j] = v;
        as[j & 7] += v;
        aw[j & 7] = fma(v, d, aw[j & 7]);
    }
    *s = pd_fold8(as);
    *w = pd_fold8(aw);
    if (run)
        *run = sc_runsum(e, n8, *run, out);
}

/* r + p[0] + p[1] + ... + p[n - 1] added left to right (p >= 0), its value after each block of
 * PD_RB values (and after the last) into out (the format's running sum) */
static double sc_runsum(const double *p, npy_intp n, double r, double *out)
{
    npy_intp j;
    for (j = 0; j < n; j++) {
        r += p[j];
        if (j % PD_RB == PD_RB - 1 || j == n - 1)
            out[j / PD_RB] = r;
    }
    return r;
}

#ifdef PD_X86
#include <immintrin.h>

/* ---- AVX2: 8 lanes as two __m256d (lanes 0-3, 4-7) */
#define PD_T2 __attribute__((target("avx2,fma,f16c"))) /* the AVX2 path requires F16C (dispatch.c) */

PD_T2 static inline __m256d v2_exp(__m256d x) /* x >= PD_XMIN, as the next */
{
    const __m256d sh = _mm256_set1_pd(PD_SHIFT);
    __m256d t, n, r, p;
    __m256i u, k, h;
    int i;
    t = _mm256_fmadd_pd(x, _mm256_set1_pd(PD_L16), sh);
    n = _mm256_sub_pd(t, sh);
    r = _mm256_fnmadd_pd(n, _mm256_set1_pd(PD_LN2HI), x);
    r = _mm256_fnmadd_pd(n, _mm256_set1_pd(PD_LN2LO), r);
    p = _mm256_set1_pd(pd_ec[7]);
    for (i = 6; i >= 0; i--)
        p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(pd_ec[i]));
    u = _mm256_castpd_si256(t);
    p = _mm256_mul_pd(p, _mm256_i64gather_pd(pd_e2, _mm256_and_si256(u, _mm256_set1_epi64x(15)), 8));
    k = _mm256_sub_epi64(_mm256_srli_epi64(u, 4), _mm256_set1_epi64x((int64_t)(PD_SHIFT_BITS >> 4)));
    h = _mm256_srli_epi64(_mm256_add_epi64(k, _mm256_set1_epi64x(2048)), 1);
    p = _mm256_mul_pd(p, _mm256_castsi256_pd(_mm256_slli_epi64(
                             _mm256_sub_epi64(h, _mm256_set1_epi64x(1)), 52)));
    return _mm256_mul_pd(p, _mm256_castsi256_pd(_mm256_slli_epi64(
                                _mm256_sub_epi64(_mm256_add_epi64(k, _mm256_set1_epi64x(2047)), h), 52)));
}

PD_T2 static double v2_fold(__m256d lo, __m256d hi)
{
    __m256d s = _mm256_add_pd(lo, hi);
    __m128d t = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    return _mm_cvtsd_f64(_mm_add_sd(t, _mm_unpackhi_pd(t, t)));
}

PD_T2 static int v2_minmax(const double *p, npy_intp n8, double *mx, double *mn)
{
    __m256d a = _mm256_set1_pd(-INFINITY), b = _mm256_set1_pd(INFINITY), nan = _mm256_setzero_pd();
    double ta[4], tb[4];
    npy_intp j;
    for (j = 0; j < n8; j += 4) {
        __m256d x = _mm256_loadu_pd(p + j);
        nan = _mm256_or_pd(nan, _mm256_cmp_pd(x, x, _CMP_UNORD_Q));
        a = _mm256_max_pd(a, x);
        b = _mm256_min_pd(b, x);
    }
    _mm256_storeu_pd(ta, a);
    _mm256_storeu_pd(tb, b);
    *mx = fmax(fmax(ta[0], ta[1]), fmax(ta[2], ta[3]));
    *mn = fmin(fmin(tb[0], tb[1]), fmin(tb[2], tb[3]));
    return _mm256_movemask_pd(nan) != 0;
}

PD_T2 static npy_intp v2_next_gt(const double *p, npy_intp j, npy_intp n8, double thr)
{
    __m256d t = _mm256_set1_pd(thr);
    for (; j < n8 && (j & 7); j++)
        if (p[j] > thr)
            return j;
    for (; j < n8; j += 8) {
        unsigned m = (unsigned)_mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(p + j), t, _CMP_GT_OQ)) |
                     (unsigned)_mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(p + j + 4), t, _CMP_GT_OQ)) << 4;
        if (m)
            return j + __builtin_ctz(m);
    }
    return n8;
}

/* float32 as it is, 8 lanes (the last len % 8 values one at a time) */
PD_T2 static int v2_minmax32(const char *p, npy_intp len, double *mx, double *mn)
{
    __m256 a = _mm256_set1_ps(-INFINITY), b = _mm256_set1_ps(INFINITY), nan = _mm256_setzero_ps();
    float ta[8], tb[8];
    double x0 = -INFINITY, x1 = INFINITY;
    int bad = 0, i;
    npy_intp j;
    for (j = 0; j + 8 <= len; j += 8) {
        __m256 v = _mm256_loadu_ps((const float *)(const void *)(p + 4 * j));
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        a = _mm256_max_ps(a, v);
        b = _mm256_min_ps(b, v);
    }
    _mm256_storeu_ps(ta, a);
    _mm256_storeu_ps(tb, b);
    for (i = 0; i < 8; i++) {
        x0 = ta[i] > x0 ? ta[i] : x0;
        x1 = tb[i] < x1 ? tb[i] : x1;
    }
    for (; j < len; j++) {
        double v = pd_load_f32(p + 4 * j);
        bad |= v != v;
        x0 = v > x0 ? v : x0;
        x1 = v < x1 ? v : x1;
    }
    *mx = x0;
    *mn = x1;
    return bad || _mm256_movemask_ps(nan) != 0;
}

PD_T2 static npy_intp v2_next_gt32(const char *p, npy_intp j, npy_intp len, double thr)
{
    __m256 t = _mm256_set1_ps((float)thr); /* a float32 value (or -inf): exact */
    for (; j + 8 <= len; j += 8) {
        unsigned m = (unsigned)_mm256_movemask_ps(
            _mm256_cmp_ps(_mm256_loadu_ps((const float *)(const void *)(p + 4 * j)), t, _CMP_GT_OQ));
        if (m)
            return j + __builtin_ctz(m);
    }
    for (; j < len; j++)
        if (pd_load_f32(p + 4 * j) > thr)
            return j;
    return len;
}

/* v5_runfast's shortcut (below) in 4-lane vectors: the same exact block sums, the same bits */
PD_T2 static double v2_runfast(const double *p, npy_intp nb, double r, double *out)
{
    uint64_t bits;
    double e2, t = r, bs[PD_SCH / PD_RB];
    int bad = 0;
    npy_intp b, j;
    if (!(r >= 0x1p-1000))
        return -1.0;
    memcpy(&bits, &r, sizeof bits);
    e2 = pd_bits_d(bits & UINT64_C(0x7ff0000000000000));
    __m256d c = _mm256_set1_pd(1.5 * e2), h = _mm256_set1_pd(0x1p-53 * e2), sg = _mm256_set1_pd(-0.0);
    for (b = 0; b < nb; b++) {
        __m256d a0 = _mm256_setzero_pd(), a1 = a0, bd = a0;
        for (j = b * PD_RB; j < (b + 1) * PD_RB; j += 8) {
            __m256d v0 = _mm256_loadu_pd(p + j), q0 = _mm256_sub_pd(_mm256_add_pd(v0, c), c);
            __m256d v1 = _mm256_loadu_pd(p + j + 4), q1 = _mm256_sub_pd(_mm256_add_pd(v1, c), c);
            bd = _mm256_or_pd(bd, _mm256_cmp_pd(_mm256_andnot_pd(sg, _mm256_sub_pd(v0, q0)), h, _CMP_GE_OQ));
            bd = _mm256_or_pd(bd, _mm256_cmp_pd(_mm256_andnot_pd(sg, _mm256_sub_pd(v1, q1)), h, _CMP_GE_OQ));
            a0 = _mm256_add_pd(a0, q0);
            a1 = _mm256_add_pd(a1, q1);
        }
        bad |= _mm256_movemask_pd(bd);
        bs[b] = v2_fold(a0, a1);
    }
    for (b = 0; b < nb; b++)
        out[b] = t = t + bs[b];
    return !bad && t < 2.0 * e2 ? t : -1.0;
}

/* The running sum by a path's block shortcut ``fast`` (v2_runfast, v5_runfast: -1 where it does
 * not apply): the whole row's blocks at once, else block by block, else one add at a time. */
static double pd_runsum_by(double (*fast)(const double *, npy_intp, double, double *), const double *p,
                           npy_intp n, double r, double *out)
{
    npy_intp nb = n / PD_RB, b;
    double t = fast(p, nb, r, out);
    if (t < 0)
        for (b = 0, t = r; b < nb; b++) {
            double u = fast(p + b * PD_RB, 1, t, out + b);
            t = u < 0 ? sc_runsum(p + b * PD_RB, PD_RB, t, out + b) : u;
        }
    return nb * PD_RB < n ? sc_runsum(p + nb * PD_RB, n - nb * PD_RB, t, out + nb) : t;
}

static double v2_runsum(const double *p, npy_intp n, double r, double *out)
{
    return pd_runsum_by(v2_runfast, p, n, r, out);
}

PD_T2 static void v2_expsum(const double *p, npy_intp n8, double m, double *e, double *s, double *w,
                            double *run, double *out, const char *pf, npy_intp pfn)
{
    __m256d vm = _mm256_set1_pd(m), lo = _mm256_set1_pd(PD_XMIN), z = _mm256_setzero_pd(), s0 = z,
            s1 = z, w0 = z, w1 = z;
    npy_intp j;
    for (j = 0; j < n8; j += 8) {
        if (pf && j * 8 < pfn)
            _mm_prefetch(pf + j * 8, _MM_HINT_T1);
        __m256d d0 = _mm256_max_pd(_mm256_sub_pd(_mm256_loadu_pd(p + j), vm), lo), e0 = v2_exp(d0);
        __m256d d1 = _mm256_max_pd(_mm256_sub_pd(_mm256_loadu_pd(p + j + 4), vm), lo), e1 = v2_exp(d1);
        _mm256_storeu_pd(e + j, e0);
        _mm256_storeu_pd(e + j + 4, e1);
        s0 = _mm256_add_pd(s0, e0);
        s1 = _mm256_add_pd(s1, e1);
        w0 = _mm256_fmadd_pd(e0, d0, w0);
        w1 = _mm256_fmadd_pd(e1, d1, w1);
    }
    *s = v2_fold(s0, s1);
    *w = v2_fold(w0, w1);
    if (run)
        *run = v2_runsum(e, n8, *run, out);
}

/* ---- AVX-512: 8 lanes in one __m512d */
#define PD_T5 __attribute__((target("avx512f,avx2,fma")))

PD_T5 static inline __m512d v5_exp(__m512d x) /* x >= PD_XMIN */
{
    const __m512d sh = _mm512_set1_pd(PD_SHIFT);
    __m512d t, n, r, p;
    int i;
    t = _mm512_fmadd_pd(x, _mm512_set1_pd(PD_L16), sh);
    n = _mm512_sub_pd(t, sh);
    r = _mm512_fnmadd_pd(n, _mm512_set1_pd(PD_LN2HI), x);
    r = _mm512_fnmadd_pd(n, _mm512_set1_pd(PD_LN2LO), r);
    p = _mm512_set1_pd(pd_ec[7]);
    for (i = 6; i >= 0; i--)
        p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(pd_ec[i]));
    /* the table by the low 4 bits of t (= n mod 16); 2^floor(n / 16) by vscalefpd */
    p = _mm512_mul_pd(p, _mm512_permutex2var_pd(_mm512_loadu_pd(pd_e2), _mm512_castpd_si512(t),
                                                _mm512_loadu_pd(pd_e2 + 8)));
    return _mm512_scalef_pd(p, _mm512_mul_pd(n, _mm512_set1_pd(0.0625)));
}

PD_T5 static double v5_fold(__m512d a)
{
    __m256d s = _mm256_add_pd(_mm512_castpd512_pd256(a), _mm512_extractf64x4_pd(a, 1));
    __m128d t = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    return _mm_cvtsd_f64(_mm_add_sd(t, _mm_unpackhi_pd(t, t)));
}

PD_T5 static int v5_minmax(const double *p, npy_intp n8, double *mx, double *mn)
{
    __m512d a = _mm512_set1_pd(-INFINITY), b = _mm512_set1_pd(INFINITY);
    __mmask8 nan = 0;
    double ta[8], tb[8];
    npy_intp j;
    int i;
    for (j = 0; j < n8; j += 8) {
        __m512d x = _mm512_loadu_pd(p + j);
        nan |= _mm512_cmp_pd_mask(x, x, _CMP_UNORD_Q);
        a = _mm512_max_pd(a, x);
        b = _mm512_min_pd(b, x);
    }
    _mm512_storeu_pd(ta, a);
    _mm512_storeu_pd(tb, b);
    for (i = 1; i < 8; i++) {
        ta[0] = fmax(ta[0], ta[i]);
        tb[0] = fmin(tb[0], tb[i]);
    }
    *mx = ta[0];
    *mn = tb[0];
    return nan != 0;
}

PD_T5 static npy_intp v5_next_gt(const double *p, npy_intp j, npy_intp n8, double thr)
{
    __m512d t = _mm512_set1_pd(thr);
    for (; j < n8 && (j & 7); j++)
        if (p[j] > thr)
            return j;
    for (; j < n8; j += 8) {
        unsigned m = _mm512_cmp_pd_mask(_mm512_loadu_pd(p + j), t, _CMP_GT_OQ);
        if (m)
            return j + __builtin_ctz(m);
    }
    return n8;
}


/* float32 as it is, 16 lanes (the tail masked) */
#define PD_M16(len, j) ((len) - (j) >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << ((len) - (j))) - 1))

PD_T5 static int v5_minmax32(const char *p, npy_intp len, double *mx, double *mn)
{
    __m512 a = _mm512_set1_ps(-INFINITY), b = _mm512_set1_ps(INFINITY);
    __mmask16 nan = 0;
    npy_intp j;
    for (j = 0; j < len; j += 16) {
        __mmask16 k = PD_M16(len, j);
        __m512 v = _mm512_maskz_loadu_ps(k, p + 4 * j);
        nan |= _mm512_mask_cmp_ps_mask(k, v, v, _CMP_UNORD_Q);
        a = _mm512_mask_max_ps(a, k, a, v);
        b = _mm512_mask_min_ps(b, k, b, v);
    }
    *mx = _mm512_reduce_max_ps(a);
    *mn = _mm512_reduce_min_ps(b);
    return nan != 0;
}

PD_T5 static npy_intp v5_next_gt32(const char *p, npy_intp j, npy_intp len, double thr)
{
    __m512 t = _mm512_set1_ps((float)thr); /* a float32 value (or -inf): exact */
    for (; j < len; j += 16) {
        __mmask16 k = PD_M16(len, j);
        unsigned m = _mm512_mask_cmp_ps_mask(k, _mm512_maskz_loadu_ps(k, p + 4 * j), t, _CMP_GT_OQ);
        if (m)
            return j + __builtin_ctz(m);
    }
    return len;
}

/* The running sum without its latency chain: while r stays in its binade [2^E, 2^(E+1)) (ulp
 * u), r + p_i rounds to r + q_i, q_i = p_i rounded to a multiple of u (by the 1.5 2^E shift),
 * when |p_i - q_i| < u/2 (no tie); then every partial sum is a multiple of u below 2^(E+1), exact
 * in any order (a rounded one would carry the total to 2^(E+1) or above).  So each block is summed
 * in lanes with the E of r at the start, the block sums added in order; where that fails (a
 * binade crossed, a tie, r below 2^-1000: a few times a row), block by block, then one add at a
 * time. */
PD_T5 static double v5_runfast(const double *p, npy_intp nb, double r, double *out)
{
    uint64_t bits;
    double e2, t = r, bs[PD_SCH / PD_RB];
    __mmask8 bad = 0;
    npy_intp b, j;
    if (!(r >= 0x1p-1000))
        return -1.0;
    memcpy(&bits, &r, sizeof bits);
    e2 = pd_bits_d(bits & UINT64_C(0x7ff0000000000000));
    __m512d c = _mm512_set1_pd(1.5 * e2), h = _mm512_set1_pd(0x1p-53 * e2);
    for (b = 0; b < nb; b++) {
        __m512d a0 = _mm512_setzero_pd(), a1 = a0;
        for (j = b * PD_RB; j < (b + 1) * PD_RB; j += 16) {
            __m512d v0 = _mm512_loadu_pd(p + j), q0 = _mm512_sub_pd(_mm512_add_pd(v0, c), c);
            __m512d v1 = _mm512_loadu_pd(p + j + 8), q1 = _mm512_sub_pd(_mm512_add_pd(v1, c), c);
            bad |= _mm512_cmp_pd_mask(_mm512_abs_pd(_mm512_sub_pd(v0, q0)), h, _CMP_GE_OQ);
            bad |= _mm512_cmp_pd_mask(_mm512_abs_pd(_mm512_sub_pd(v1, q1)), h, _CMP_GE_OQ);
            a0 = _mm512_add_pd(a0, q0);
            a1 = _mm512_add_pd(a1, q1);
        }
        bs[b] = v5_fold(_mm512_add_pd(a0, a1));
    }
    for (b = 0; b < nb; b++)
        out[b] = t = t + bs[b];
    return !bad && t < 2.0 * e2 ? t : -1.0;
}

static double v5_runsum(const double *p, npy_intp n, double r, double *out)
{
    return pd_runsum_by(v5_runfast, p, n, r, out);
}

PD_T5 static void v5_expsum(const double *p, npy_intp n8, double m, double *e, double *s, double *w,
                            double *run, double *out, const char *pf, npy_intp pfn)
{
    __m512d vm = _mm512_set1_pd(m), lo = _mm512_set1_pd(PD_XMIN), as = _mm512_setzero_pd(), aw = as;
    npy_intp j;
    for (j = 0; j < n8; j += 8) {
        if (pf && j * 8 < pfn)
            _mm_prefetch(pf + j * 8, _MM_HINT_T1);
        __m512d d = _mm512_max_pd(_mm512_sub_pd(_mm512_loadu_pd(p + j), vm), lo), v = v5_exp(d);
        _mm512_storeu_pd(e + j, v);
        as = _mm512_add_pd(as, v);
        aw = _mm512_fmadd_pd(v, d, aw);
    }
    *s = v5_fold(as);
    *w = v5_fold(aw);
    if (run) /* after the loop: in it, the exps ran slower */
        *run = v5_runsum(e, n8, *run, out);
}

/* expsum on len float32 values as they are (no float64 copy), the ids top[0 .. nt) (sorted,
 * relative to p) and the lanes past len counted as -inf: the same e, s, w, run and out as
 * expsum on the converted chunk with those ids set to -inf (exp(PD_XMIN) = 0, and 0 d = 0) */
PD_T5 static void v5_expsum32(const char *p, npy_intp len, const npy_intp *top, npy_intp nt, double m,
                              double *e, double *s, double *w, double *run, double *out,
                              const char *pf, npy_intp pfn)
{
    __m512d vm = _mm512_set1_pd(m), lo = _mm512_set1_pd(PD_XMIN), as = _mm512_setzero_pd(), aw = as;
    npy_intp j, t = 0, n8 = (len + 7) & ~(npy_intp)7;
    for (j = 0; j < n8; j += 8) {
        __mmask8 k = len - j >= 8 ? (__mmask8)0xff : (__mmask8)((1u << (len - j)) - 1);
        if (pf && j * 8 < pfn)
            _mm_prefetch(pf + j * 8, _MM_HINT_T1);
        for (; t < nt && top[t] < j + 8; t++)
            k &= (__mmask8)~(1u << (top[t] - j));
        __m512d x = _mm512_cvtps_pd(_mm512_castps512_ps256(_mm512_maskz_loadu_ps((__mmask16)k, p + 4 * j)));
        __m512d d = _mm512_max_pd(_mm512_sub_pd(x, vm), lo), v = _mm512_maskz_mov_pd(k, v5_exp(d));
        _mm512_storeu_pd(e + j, v);
        as = _mm512_add_pd(as, v);
        aw = _mm512_fmadd_pd(v, d, aw);
    }
    *s = v5_fold(as);
    *w = v5_fold(aw);
    if (run)
        *run = v5_runsum(e, n8, *run, out);
}

#endif

/* ------------------------------------------------------------------------------- top K */
int pd_cand_cmp(const void *x, const void *y)
{
    const pd_cand *a = x, *b = y;
    return pd_before(a, b) ? -1 : pd_before(b, a);
}

int pd_id_cmp(const void *x, const void *y)
{
    npy_intp a = *(const npy_intp *)x, b = *(const npy_intp *)y;
    return (a > b) - (a < b);
}

/* Rearrange c[0..n) so that c[0..k) are its k first in the order (0 < k < n): Hoare's
 * selection with a median-of-three pivot. */
void pd_select(pd_cand *c, npy_intp n, npy_intp k)
{
    npy_intp lo = 0, hi = n - 1, t = k - 1;
    while (lo < hi) {
        pd_cand a = c[lo], b = c[lo + (hi - lo) / 2], d = c[hi], piv, tmp;
        npy_intp i = lo, j = hi;
        if (pd_before(&a, &b))
            piv = pd_before(&b, &d) ? b : pd_before(&a, &d) ? d : a;
        else
            piv = pd_before(&a, &d) ? a : pd_before(&b, &d) ? d : b;
        while (i <= j) {
            while (pd_before(&c[i], &piv))
                i++;
            while (pd_before(&piv, &c[j]))
                j--;
            if (i <= j) {
                tmp = c[i];
                c[i++] = c[j];
                c[j--] = tmp;
            }
        }
        if (t <= j)
            hi = j;
        else if (t >= i)
            lo = i;
        else
            break;
    }
}

/* ------------------------------------------------------------------------------- one row */
typedef struct {
    const pd_sm_ops *ops;
    const pd_mat *a;
    npy_intp K, M, kk, cap, nch;
    const pd_summary_out *out;
    const double *offsets; /* rows: the probes' offsets (NULL: 1/2) */
    npy_intp rlast;    /* the last row of this share (the next row is prefetched up to it) */
    pd_cand *cand;     /* cap */
    npy_intp *sid;     /* kk: the top ids in increasing order */
    npy_intp *rel;     /* kk: a chunk's top ids, relative to its start (expsum32) */
    double *buf, *eb;  /* PD_SCH each: the values, their exps */
    double *rend;      /* (V + PD_RB - 1) / PD_RB: the running sum at each block's end */
} pd_sm_ctx;

/* row[c0 .. c0 + len) as float64 into buf, padded to a multiple of 8 with pad (NAN: buf[0]);
 * compiled per ISA so that the conversions vectorise */
#define PD_SM_LOAD(NAME, ATTR)                                                                    \
    ATTR static void NAME(pd_dtype dt, const char *p, npy_intp len, double *b)                   \
    {                                                                                             \
        npy_intp j;                                                                               \
        switch (dt) {                                                                             \
        case PD_F64: memcpy(b, p, (size_t)len * sizeof(double)); break;                          \
        case PD_F32: for (j = 0; j < len; j++) b[j] = pd_load_f32(p + 4 * j); break;             \
        case PD_F16: for (j = 0; j < len; j++) b[j] = pd_load_f16(p + 2 * j); break;             \
        default: for (j = 0; j < len; j++) b[j] = pd_load_bf16(p + 2 * j); break;                \
        }                                                                                         \
    }
PD_SM_LOAD(sc_load, )
#ifdef PD_X86
PD_SM_LOAD(v2_load_any, PD_T2)
PD_SM_LOAD(v5_load_any, PD_T5)
/* AVX2: float16 (vcvtph2ps) and bfloat16 widened 8 at a time, exactly */
PD_T2 static void v2_load(pd_dtype dt, const char *p, npy_intp len, double *b)
{
    npy_intp j = 0;
    if (dt == PD_F16 || dt == PD_BF16) {
        for (; j + 8 <= len; j += 8) {
            __m128i h = _mm_loadu_si128((const __m128i *)(const void *)(p + 2 * j));
            __m256 f = dt == PD_F16 ? _mm256_cvtph_ps(h)
                                    : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
            _mm256_storeu_pd(b + j, _mm256_cvtps_pd(_mm256_castps256_ps128(f)));
            _mm256_storeu_pd(b + j + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
        }
        p += 2 * j;
    }
    v2_load_any(dt, p, len - j, b + j);
}
/* AVX-512: the same, 16 at a time */
PD_T5 static void v5_load(pd_dtype dt, const char *p, npy_intp len, double *b)
{
    npy_intp j = 0;
    if (dt == PD_F16 || dt == PD_BF16) {
        for (; j + 16 <= len; j += 16) {
            __m256i h = _mm256_loadu_si256((const __m256i *)(p + 2 * j));
            __m512 f = dt == PD_F16 ? _mm512_cvtph_ps(h)
                                    : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
            _mm512_storeu_pd(b + j, _mm512_cvtps_pd(_mm512_castps512_ps256(f)));
            _mm512_storeu_pd(b + j + 8, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1))));
        }
        p += 2 * j;
    }
    v5_load_any(dt, p, len - j, b + j);
}
#endif

static const pd_sm_ops pd_sm_scalar = {sc_minmax, sc_next_gt, sc_expsum, NULL, NULL, sc_load, NULL};
#ifdef PD_X86
static const pd_sm_ops pd_sm_avx2 = {v2_minmax, v2_next_gt, v2_expsum, v2_minmax32,
                                     v2_next_gt32, v2_load, NULL};
static const pd_sm_ops pd_sm_avx512 = {v5_minmax, v5_next_gt, v5_expsum, v5_minmax32,
                                       v5_next_gt32, v5_load, v5_expsum32};
#endif

static npy_intp pd_sm_load(const pd_sm_ctx *x, const char *row, npy_intp c0, npy_intp lim, double pad)
{
    npy_intp len = x->a->V - c0 < lim ? x->a->V - c0 : lim, n8 = (len + 7) & ~(npy_intp)7, j;
    double *b = x->buf;
    x->ops->load(x->a->dt, row + c0 * pd_itemsize[x->a->dt], len, b);
    pad = pad != pad ? b[0] : pad;
    for (j = len; j < n8; j++)
        b[j] = pad;
    return len;
}

/* e_i of ids c0 .. c0 + lim (or the row's end) into e, 0 at the top ids (*si: the first top id
 * not below c0), their sums and the running sum (expsum); returns their number. */
static npy_intp pd_sm_exps(const pd_sm_ctx *x, const char *row, npy_intp c0, npy_intp lim, double m,
                           npy_intp *si, double *s, double *w, double *e, double *run, double *out,
                           int pf)
{
    npy_intp len, isz = pd_itemsize[x->a->dt], t0 = *si;
    const char *nx;
    if (x->a->dt == PD_F32 && x->ops->expsum32) {
        len = x->a->V - c0 < lim ? x->a->V - c0 : lim;
        for (; *si < x->kk && x->sid[*si] < c0 + len; (*si)++)
            x->rel[*si - t0] = x->sid[*si] - c0;
    }
    else {
        len = pd_sm_load(x, row, c0, lim, -INFINITY);
        while (*si < x->kk && x->sid[*si] < c0 + len)
            x->buf[x->sid[(*si)++] - c0] = -INFINITY;
    }
    nx = pf ? row + x->a->rstride + c0 * isz : NULL;
    if (x->a->dt == PD_F32 && x->ops->expsum32)
        x->ops->expsum32(row + 4 * c0, len, x->rel, *si - t0, m, e, s, w, run, out, nx, len * isz);
    else
        x->ops->expsum(x->buf, (len + 7) & ~(npy_intp)7, m, e, s, w, run, out, nx, len * isz);
    return len;
}

static int pd_sm_row(pd_sm_ctx *x, npy_intp r)
{
    const pd_mat *a = x->a;
    const pd_summary_out *o = x->out;
    const char *row = a->base + r * a->rstride;
    npy_intp V = a->V, kk = x->kk, K = x->K, M = x->M, nc = 0, c, j, si = 0;
    double m = -INFINITY, mn = INFINITY, thr = -INFINITY, S = 0, W = 0, Wt = 0, T = 0, R = 0, ls, cs, cw;
    int filt = 0, f32 = a->dt == PD_F32 && x->ops->minmax32;

    /* 1: max, min, NaN, top-K candidates (float32 rows read as they are where the path can) */
    for (c = 0; c < x->nch; c++) {
        npy_intp c0 = c * PD_SCH, len = V - c0 < PD_SCH ? V - c0 : PD_SCH, n8 = (len + 7) & ~(npy_intp)7;
        const char *p32 = f32 ? row + 4 * c0 : NULL;
        double cm, cn;
        if (f32 ? x->ops->minmax32(p32, len, &cm, &cn)
                : (pd_sm_load(x, row, c0, PD_SCH, NAN), x->ops->minmax(x->buf, n8, &cm, &cn)))
            return -1;
        m = cm > m ? cm : m;
        mn = cn < mn ? cn : mn;
        for (j = 0; !filt && j < len; j++) {
            x->cand[nc++] = (pd_cand){f32 ? pd_load_f32(p32 + 4 * j) : x->buf[j], c0 + j};
            if (nc == kk) { /* the threshold: the smallest of the first kk */
                npy_intp i;
                filt = kk < V;
                for (i = 0; i < nc; i++)
                    thr = i == 0 || x->cand[i].v < thr ? x->cand[i].v : thr;
            }
        }
        while (filt && (j = f32 ? x->ops->next_gt32(p32, j, len, thr) : x->ops->next_gt(x->buf, j, n8, thr)) < len) {
            x->cand[nc++] = (pd_cand){f32 ? pd_load_f32(p32 + 4 * j) : x->buf[j], c0 + j};
            if (nc == x->cap) {
                npy_intp i;
                pd_select(x->cand, nc, kk);
                nc = kk;
                for (thr = x->cand[0].v, i = 1; i < kk; i++)
                    thr = x->cand[i].v < thr ? x->cand[i].v : thr;
            }
            j++;
        }
    }
    if (m == INFINITY || m == -INFINITY)
        return -1;
    m += 0.0; /* -0 as +0, whichever of the two a path's max kept */
    mn += 0.0;
    if (nc > kk)
        pd_select(x->cand, nc, kk);
    qsort(x->cand, (size_t)kk, sizeof(pd_cand), pd_cand_cmp);
    for (j = 0; j < kk; j++)
        x->sid[j] = x->cand[j].id;
    qsort(x->sid, (size_t)kk, sizeof(npy_intp), pd_id_cmp);

    /* 2: the tail's exps (the top ids masked), their sums T and W, the running sum at each
     * block's end; then S = T + the top's exps but the argmax's (e = 1, d = 0: ls = log1p S),
     * smallest first, and W their e d */
    for (c = 0; c < x->nch; c++) {
        int run = M && kk < V;
        pd_sm_exps(x, row, c * PD_SCH, PD_SCH, m, &si, &cs, &cw, x->eb, run ? &R : NULL,
                   x->rend + c * (PD_SCH / PD_RB), r < x->rlast);
        T += cs;
        W += cw;
    }
    for (j = kk - 1; j > 0; j--) {
        double d = x->cand[j].v - m, v;
        d = d < PD_XMIN ? PD_XMIN : d;
        v = pd_expd(d);
        S += v;
        Wt = fma(v, d, Wt);
    }
    S += T;
    W += Wt;
    ls = log1p(S);
    o->entropy[r] = ls - W / (1.0 + S);
    o->lp_min[r] = (mn - m) - ls;
    o->tail[r] = kk < V ? log(T) - ls : -INFINITY;
    for (j = 0; j < K; j++) {
        o->ids[r * K + j] = j < kk ? (int32_t)x->cand[j].id : -1;
        o->lps[r * K + j] = j < kk ? (float)((x->cand[j].v - m) - ls) : -INFINITY;
    }

    /* the probes: the first i with R_i > (j + u)/M R: its block from the block-end sums, then
     * that block's exps and running sum again (the same values) */
    if (M) {
        npy_intp cur = -1, len = 0, pos, nb = (V + PD_RB - 1) / PD_RB;
        for (c = 0, j = 0; j < M; j++) {
            double q = ((double)j + (x->offsets ? x->offsets[r] : 0.5)) / (double)M * R, run = 0.0;
            if (kk >= V || !(R > 0)) {
                o->pids[r * M + j] = -1;
                o->plps[r * M + j] = -INFINITY;
                continue;
            }
            while (c < nb && !(x->rend[c] > q))
                c++;
            if (c == nb) {
                pos = V - 1; /* q rounded up to R (subnormal totals): as probe_positions */
            }
            else {
                npy_intp i = 0;
                if (cur != c) {
                    for (si = 0; si < kk && x->sid[si] < c * PD_RB; si++)
                        ;
                    len = pd_sm_exps(x, row, c * PD_RB, PD_RB, m, &si, &cs, &cw, x->eb, NULL, NULL, 0);
                    cur = c;
                }
                run = c > 0 ? x->rend[c - 1] : 0.0;
                for (; i < len - 1; i++) { /* the same sums as pass 2: run reaches rend[c] > q */
                    run += x->eb[i];
                    if (run > q)
                        break;
                }
                pos = c * PD_RB + i;
            }
            o->pids[r * M + j] = (int32_t)pos;
            o->plps[r * M + j] = (float)((pd_load(a->dt, row + pos * pd_itemsize[a->dt]) - m) - ls);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------- threads */
/* One share of rows (pd_run_rows): its own copy of the context, with its own buffers. */
static void pd_sm_rows(void *ctx, npy_intp r0, npy_intp r1, npy_intp *bad_row, int *bad_kind)
{
    pd_sm_ctx xs = *(const pd_sm_ctx *)ctx, *x = &xs;
    npy_intp r;
    if (r0 >= r1)
        return;
    x->rlast = r1 - 1;
    x->cand = malloc((size_t)x->cap * sizeof(pd_cand));
    x->sid = malloc((size_t)x->kk * sizeof(npy_intp));
    x->rel = malloc((size_t)x->kk * sizeof(npy_intp));
    x->buf = malloc(2 * PD_SCH * sizeof(double));
    x->rend = malloc((size_t)((x->a->V + PD_RB - 1) / PD_RB) * sizeof(double));
    x->eb = x->buf ? x->buf + PD_SCH : NULL;
    if (!x->cand || !x->sid || !x->rel || !x->buf || !x->rend) {
        *bad_row = r0;
        *bad_kind = 3;
    }
    else
        for (r = r0; r < r1; r++)
            if (pd_sm_row(x, r) < 0) {
                *bad_row = r;
                *bad_kind = 2;
                break;
            }
    free(x->cand);
    free(x->sid);
    free(x->rel);
    free(x->buf);
    free(x->rend);
}

/* e[i] = exp(x[i]) for x[i] <= 0 (-inf and anything below PD_XMIN give 0) with the kernel's exp:
 * the same bits on every path (compare.c's exps too). */
#ifdef PD_X86
PD_T5 static void v5_exp_many(const double *x, double *e, npy_intp n)
{
    const __m512d lo = _mm512_set1_pd(PD_XMIN);
    npy_intp i = 0;
    for (; i + 8 <= n; i += 8)
        _mm512_storeu_pd(e + i, v5_exp(_mm512_max_pd(_mm512_loadu_pd(x + i), lo)));
    for (; i < n; i++)
        e[i] = pd_expd(x[i]);
}

PD_T2 static void v2_exp_many(const double *x, double *e, npy_intp n)
{
    const __m256d lo = _mm256_set1_pd(PD_XMIN);
    npy_intp i = 0;
    for (; i + 4 <= n; i += 4)
        _mm256_storeu_pd(e + i, v2_exp(_mm256_max_pd(_mm256_loadu_pd(x + i), lo)));
    for (; i < n; i++)
        e[i] = pd_expd(x[i]);
}
#endif

double pd_runsum(pd_isa isa, const double *p, npy_intp n, double r, double *out)
{
#ifdef PD_X86
    if (isa == PD_ISA_AVX512)
        return v5_runsum(p, n, r, out);
    if (isa == PD_ISA_AVX2)
        return v2_runsum(p, n, r, out);
#endif
    (void)isa;
    return sc_runsum(p, n, r, out);
}

void pd_load_many(pd_isa isa, pd_dtype dt, const char *p, npy_intp len, double *b)
{
#ifdef PD_X86
    if (isa == PD_ISA_AVX512) {
        v5_load(dt, p, len, b);
        return;
    }
    if (isa == PD_ISA_AVX2) {
        v2_load(dt, p, len, b);
        return;
    }
#endif
    (void)isa;
    sc_load(dt, p, len, b);
}

void pd_exp_many(pd_isa isa, const double *x, double *e, npy_intp n)
{
    npy_intp i;
#ifdef PD_X86
    if (isa == PD_ISA_AVX512) {
        v5_exp_many(x, e, n);
        return;
    }
    if (isa == PD_ISA_AVX2) {
        v2_exp_many(x, e, n);
        return;
    }
#endif
    (void)isa;
    for (i = 0; i < n; i++)
        e[i] = pd_expd(x[i]);
}

int pd_summarize_run(pd_isa isa, const pd_mat *a, npy_intp k, npy_intp probes, const double *offsets,
                     int threads, const pd_summary_out *out, npy_intp *bad_row, int *bad_kind)
{
    pd_sm_ctx x;
    memset(&x, 0, sizeof x);
    x.ops = &pd_sm_scalar;
#ifdef PD_X86
    if (isa == PD_ISA_AVX512)
        x.ops = &pd_sm_avx512;
    else if (isa == PD_ISA_AVX2)
        x.ops = &pd_sm_avx2;
#else
    (void)isa;
#endif
    x.a = a;
    x.K = k;
    x.M = probes;
    x.offsets = offsets;
    x.kk = k < a->V ? k : a->V;
    x.cap = x.kk + (x.kk > 32 ? x.kk : 32);
    x.nch = (a->V + PD_SCH - 1) / PD_SCH;
    x.out = out;
    return pd_run_rows(pd_sm_rows, &x, a->rows, threads, bad_row, bad_kind);
}
