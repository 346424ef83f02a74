/* The reference record of a logits row (refstats.summarize; docs/reference-format.md): in two
 * reads of the row, chunk by chunk (PD_SCH values converted to float64 in an L1 buffer):
 *
 *   1. max, min, NaN check, and the top K by a threshold filter: a candidate buffer takes the
 *      values above the K-th best so far (a SIMD compare finds them); when it is full the K best
 *      are selected (quickselect) and the threshold rises.  Then the K best are sorted (value
 *      down, id up: a later equal value never beats an earlier one, so the filter is strict).
 *   2. e_i = exp(x_i - max) (a float64 exp of our own, below), and in float64 lanes:
 *      S = sum of the e_i but the first argmax's, W = sum_{e_i > 0} e_i (x_i - max),
 *      T = sum of the e_i outside the top K; with probes, also the running sum R_i of those
 *      e_i left to right (the format's definition), kept at the end of each chunk, summed
 *      while the next chunk's exps are computed (the add chain hides under them).
 *
 * The argmax's e is exactly 1, so ls = log1p(S) keeps its relative accuracy when one token
 * holds nearly all the mass; entropy = ls - W / (1 + S) (= -sum p_i a_i with p_i = e_i / (1 + S):
 * two non-negative terms, no cancellation), lp_min = (min - max) - ls, tail = log T - ls, and
 * probe j is the first i with R_i > (j + 1/2)/M R (the last id if none: a total so small that
 * the threshold rounds up to it, as refstats.probe_positions): the chunk is found from the
 * chunk-end sums and only that chunk's running sum is computed again (the same exps and adds,
 * so the same values).
 *
 * Every SIMD path gives the same bits: the exp uses no FMA (so the portable C exp rounds
 * exactly as the vector ones), and the lane sums have one fixed order (8 lanes by index mod 8
 * within a chunk, folded ((0+4)+(2+6))+((1+5)+(3+7)), chunk sums added in order).
 * Memory per thread: O(K) candidates and a few chunk buffers; no (rows x vocab) temporary. */
#include "summarize.h"
#include <stdlib.h>

#define PD_SCH 1024          /* values per chunk (a multiple of 8) */
#define PD_XMIN (-746.0)     /* exp(x) rounds to 0 below this (and -inf is clamped to it) */

/* ------------------------------------------------------------------------------- exp(x), x <= 0
 * x = n ln2 + r (n = round(x log2 e) by the 1.5 2^52 shift; ln2 in two parts, the first with 32
 * significant bits so n ln2_hi is exact), exp(r) by its Taylor polynomial of degree 13
 * (|r| <= 0.3466: truncation below 2^-57), 2^n in two factors so that results below 2^-1022
 * round once into the subnormals.  Each operation is a separate multiply or add, so every path
 * rounds the same way; about 2 ulp (the error model allows 16). */
#define PD_SHIFT 0x1.8p52
#define PD_LOG2E 0x1.71547652b82fep+0
#define PD_LN2HI 0x1.62e42fee00000p-1
#define PD_LN2LO 0x1.a39ef35793c76p-33
static const double pd_ec[14] = {
    0x1.0000000000000p+0, 0x1.0000000000000p+0, 0x1.0000000000000p-1, 0x1.5555555555555p-3,
    0x1.5555555555555p-5, 0x1.1111111111111p-7, 0x1.6c16c16c16c17p-10, 0x1.a01a01a01a01ap-13,
    0x1.a01a01a01a01ap-16, 0x1.71de3a556c734p-19, 0x1.27e4fb7789f5cp-22, 0x1.ae64567f544e4p-26,
    0x1.1eed8eff8d898p-29, 0x1.6124613a86d09p-33};

static inline double pd_bits_d(uint64_t u) { double d; memcpy(&d, &u, sizeof d); return d; }

static inline double pd_expd(double x)
{
    double t, n, r, u, p;
    int64_t k, h;
    int i;
    x = x < PD_XMIN ? PD_XMIN : x;
    t = x * PD_LOG2E;
    t = t + PD_SHIFT;
    n = t - PD_SHIFT;
    u = n * PD_LN2HI;
    r = x - u;
    u = n * PD_LN2LO;
    r = r - u;
    p = pd_ec[13];
    for (i = 12; i >= 0; i--) {
        p = p * r;
        p = p + pd_ec[i];
    }
    k = (int64_t)n;                 /* in [-1077, 0] */
    h = (k + 2048) >> 1;            /* floor(k / 2) + 1024 */
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
    /* e = exp(p - m); *s = sum e, *w = sum_{e > 0} e (p - m) (8 lanes, pd_fold8); and, in the
     * same loop (the latency-bound running sum then hides under the exps), *run += prev[i] for
     * i = 0 .. nprev - 1 in order */
    void (*expsum)(const double *p, npy_intp n8, double m, double *e, double *s, double *w,
                   const double *prev, npy_intp nprev, double *run);
    double (*lanesum)(const double *p, npy_intp n8); /* sum (8 lanes, pd_fold8) */
    void (*load)(pd_dtype dt, const char *p, npy_intp len, double *b); /* row values as float64 */
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

static void sc_expsum(const double *p, npy_intp n8, double m, double *e, double *s, double *w,
                      const double *prev, npy_intp nprev, double *run)
{
    double as[8] = {0}, aw[8] = {0};
    npy_intp j;
    for (j = 0; j < n8; j++) {
        double d = p[j] - m, v = pd_expd(d), dw = v > 0 ? v * d : 0.0;
        e[j] = v;
        as[j & 7] += v;
        aw[j & 7] += dw;
    }
    *s = pd_fold8(as);
    *w = pd_fold8(aw);
    for (j = 0; j < nprev; j++)
        *run += prev[j];
}

#define PD_RUN8(r, q, i)                                                                          \
    (r += q[i], r += q[i + 1], r += q[i + 2], r += q[i + 3], r += q[i + 4], r += q[i + 5],         \
     r += q[i + 6], r += q[i + 7])

static double sc_lanesum(const double *p, npy_intp n8)
{
    double a[8] = {0};
    npy_intp j;
    for (j = 0; j < n8; j++)
        a[j & 7] += p[j];
    return pd_fold8(a);
}


#ifdef PD_X86
#include <immintrin.h>

/* ---- AVX2: 8 lanes as two __m256d (lanes 0-3, 4-7) */
#define PD_T2 __attribute__((target("avx2")))

PD_T2 static inline __m256d v2_exp(__m256d x)
{
    const __m256d sh = _mm256_set1_pd(PD_SHIFT);
    __m256d t, n, r, p;
    __m256i k, h;
    int i;
    x = _mm256_max_pd(x, _mm256_set1_pd(PD_XMIN));
    t = _mm256_add_pd(_mm256_mul_pd(x, _mm256_set1_pd(PD_LOG2E)), sh);
    n = _mm256_sub_pd(t, sh);
    r = _mm256_sub_pd(x, _mm256_mul_pd(n, _mm256_set1_pd(PD_LN2HI)));
    r = _mm256_sub_pd(r, _mm256_mul_pd(n, _mm256_set1_pd(PD_LN2LO)));
    p = _mm256_set1_pd(pd_ec[13]);
    for (i = 12; i >= 0; i--)
        p = _mm256_add_pd(_mm256_mul_pd(p, r), _mm256_set1_pd(pd_ec[i]));
    k = _mm256_sub_epi64(_mm256_castpd_si256(t), _mm256_castpd_si256(sh));
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

PD_T2 static void v2_expsum(const double *p, npy_intp n8, double m, double *e, double *s, double *w,
                            const double *prev, npy_intp nprev, double *run)
{
    __m256d vm = _mm256_set1_pd(m), z = _mm256_setzero_pd(), s0 = z, s1 = z, w0 = z, w1 = z;
    double rr = *run;
    npy_intp j, i = 0;
    for (j = 0; j < n8; j += 8) {
        if (i + 8 <= nprev) {
            PD_RUN8(rr, prev, i);
            i += 8;
        }
        __m256d d0 = _mm256_sub_pd(_mm256_loadu_pd(p + j), vm), e0 = v2_exp(d0);
        __m256d d1 = _mm256_sub_pd(_mm256_loadu_pd(p + j + 4), vm), e1 = v2_exp(d1);
        _mm256_storeu_pd(e + j, e0);
        _mm256_storeu_pd(e + j + 4, e1);
        s0 = _mm256_add_pd(s0, e0);
        s1 = _mm256_add_pd(s1, e1);
        w0 = _mm256_add_pd(w0, _mm256_and_pd(_mm256_mul_pd(e0, d0), _mm256_cmp_pd(e0, z, _CMP_GT_OQ)));
        w1 = _mm256_add_pd(w1, _mm256_and_pd(_mm256_mul_pd(e1, d1), _mm256_cmp_pd(e1, z, _CMP_GT_OQ)));
    }
    for (; i < nprev; i++)
        rr += prev[i];
    *run = rr;
    *s = v2_fold(s0, s1);
    *w = v2_fold(w0, w1);
}

PD_T2 static double v2_lanesum(const double *p, npy_intp n8)
{
    __m256d a = _mm256_setzero_pd(), b = a;
    npy_intp j;
    for (j = 0; j < n8; j += 8) {
        a = _mm256_add_pd(a, _mm256_loadu_pd(p + j));
        b = _mm256_add_pd(b, _mm256_loadu_pd(p + j + 4));
    }
    return v2_fold(a, b);
}


/* ---- AVX-512: 8 lanes in one __m512d */
#define PD_T5 __attribute__((target("avx512f,avx2")))

PD_T5 static inline __m512d v5_exp(__m512d x)
{
    const __m512d sh = _mm512_set1_pd(PD_SHIFT);
    __m512d t, n, r, p;
    __m512i k, h;
    int i;
    x = _mm512_max_pd(x, _mm512_set1_pd(PD_XMIN));
    t = _mm512_add_pd(_mm512_mul_pd(x, _mm512_set1_pd(PD_LOG2E)), sh);
    n = _mm512_sub_pd(t, sh);
    r = _mm512_sub_pd(x, _mm512_mul_pd(n, _mm512_set1_pd(PD_LN2HI)));
    r = _mm512_sub_pd(r, _mm512_mul_pd(n, _mm512_set1_pd(PD_LN2LO)));
    p = _mm512_set1_pd(pd_ec[13]);
    for (i = 12; i >= 0; i--)
        p = _mm512_add_pd(_mm512_mul_pd(p, r), _mm512_set1_pd(pd_ec[i]));
    k = _mm512_sub_epi64(_mm512_castpd_si512(t), _mm512_castpd_si512(sh));
    h = _mm512_srli_epi64(_mm512_add_epi64(k, _mm512_set1_epi64(2048)), 1);
    p = _mm512_mul_pd(p, _mm512_castsi512_pd(_mm512_slli_epi64(
                             _mm512_sub_epi64(h, _mm512_set1_epi64(1)), 52)));
    return _mm512_mul_pd(p, _mm512_castsi512_pd(_mm512_slli_epi64(
                                _mm512_sub_epi64(_mm512_add_epi64(k, _mm512_set1_epi64(2047)), h), 52)));
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

PD_T5 static void v5_expsum(const double *p, npy_intp n8, double m, double *e, double *s, double *w,
                            const double *prev, npy_intp nprev, double *run)
{
    __m512d vm = _mm512_set1_pd(m), z = _mm512_setzero_pd(), as = z, aw = z;
    double rr = *run;
    npy_intp j, i = 0;
    for (j = 0; j < n8; j += 8) {
        if (i + 8 <= nprev) {
            PD_RUN8(rr, prev, i);
            i += 8;
        }
        __m512d d = _mm512_sub_pd(_mm512_loadu_pd(p + j), vm), v = v5_exp(d);
        _mm512_storeu_pd(e + j, v);
        as = _mm512_add_pd(as, v);
        aw = _mm512_add_pd(aw, _mm512_maskz_mul_pd(_mm512_cmp_pd_mask(v, z, _CMP_GT_OQ), v, d));
    }
    for (; i < nprev; i++)
        rr += prev[i];
    *run = rr;
    *s = v5_fold(as);
    *w = v5_fold(aw);
}

PD_T5 static double v5_lanesum(const double *p, npy_intp n8)
{
    __m512d a = _mm512_setzero_pd();
    npy_intp j;
    for (j = 0; j < n8; j += 8)
        a = _mm512_add_pd(a, _mm512_loadu_pd(p + j));
    return v5_fold(a);
}

#endif

/* ------------------------------------------------------------------------------- top K */
typedef struct {
    double v;
    npy_intp id;
} pd_cand;

/* a ranks before b: larger value, ties by smaller id (ids are distinct: a strict order) */
static inline int pd_before(const pd_cand *a, const pd_cand *b)
{
    return a->v > b->v || (a->v == b->v && a->id < b->id);
}

static int pd_cand_cmp(const void *x, const void *y)
{
    const pd_cand *a = x, *b = y;
    return pd_before(a, b) ? -1 : pd_before(b, a);
}

static int pd_id_cmp(const void *x, const void *y)
{
    npy_intp a = *(const npy_intp *)x, b = *(const npy_intp *)y;
    return (a > b) - (a < b);
}

/* Rearrange c[0..n) so that c[0..k) are its k first in the order (0 < k < n): Hoare's
 * selection with a median-of-three pivot. */
static void pd_select(pd_cand *c, npy_intp n, npy_intp k)
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
    npy_intp amax;     /* the row's first argmax */
    const pd_summary_out *out;
    pd_cand *cand;     /* cap */
    npy_intp *sid;     /* kk: the top ids in increasing order */
    double *buf, *eb[2]; /* PD_SCH each: the values, the exps of two chunks */
    double *rend;      /* nch: running sum at each chunk's end */
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
PD_SM_LOAD(v2_load, PD_T2)
PD_SM_LOAD(v5_load, PD_T5)
#endif

static const pd_sm_ops pd_sm_scalar = {sc_minmax, sc_next_gt, sc_expsum, sc_lanesum, sc_load};
#ifdef PD_X86
static const pd_sm_ops pd_sm_avx2 = {v2_minmax, v2_next_gt, v2_expsum, v2_lanesum, v2_load};
static const pd_sm_ops pd_sm_avx512 = {v5_minmax, v5_next_gt, v5_expsum, v5_lanesum, v5_load};
#endif

static npy_intp pd_sm_load(const pd_sm_ctx *x, const char *row, npy_intp c0, double pad)
{
    npy_intp len = x->a->V - c0 < PD_SCH ? x->a->V - c0 : PD_SCH, n8 = (len + 7) & ~(npy_intp)7, j;
    double *b = x->buf;
    x->ops->load(x->a->dt, row + c0 * pd_itemsize[x->a->dt], len, b);
    pad = pad != pad ? b[0] : pad;
    for (j = len; j < n8; j++)
        b[j] = pad;
    return len;
}

/* e_i of chunk c into e, 0 at the top ids (*si: the first top id not below the chunk), while
 * *run sums prev[0 .. nprev). */
static npy_intp pd_sm_exps(const pd_sm_ctx *x, const char *row, npy_intp c, double m, npy_intp *si,
                           double *s, double *w, double *e, const double *prev, npy_intp nprev,
                           double *run)
{
    npy_intp c0 = c * PD_SCH, len = pd_sm_load(x, row, c0, -INFINITY);
    if (x->amax >= c0 && x->amax < c0 + len) /* its e = 1 is left out of S (ls = log1p S) */
        x->buf[x->amax - c0] = -INFINITY;
    x->ops->expsum(x->buf, (len + 7) & ~(npy_intp)7, m, e, s, w, prev, nprev, run);
    while (*si < x->kk && x->sid[*si] < c0 + len)
        e[x->sid[(*si)++] - c0] = 0.0;
    return len;
}

static int pd_sm_row(pd_sm_ctx *x, npy_intp r)
{
    const pd_mat *a = x->a;
    const pd_summary_out *o = x->out;
    const char *row = a->base + r * a->rstride;
    npy_intp V = a->V, kk = x->kk, K = x->K, M = x->M, nc = 0, c, j, si = 0;
    double m = -INFINITY, mn = INFINITY, thr = -INFINITY, S = 0, W = 0, T = 0, R = 0, ls, cs, cw;
    int filt = 0;

    /* 1: max, min, NaN, top-K candidates */
    for (c = 0; c < x->nch; c++) {
        npy_intp c0 = c * PD_SCH, len = pd_sm_load(x, row, c0, NAN), n8 = (len + 7) & ~(npy_intp)7;
        double cm, cn;
        if (x->ops->minmax(x->buf, n8, &cm, &cn))
            return -1;
        m = cm > m ? cm : m;
        mn = cn < mn ? cn : mn;
        for (j = 0; !filt && j < len; j++) {
            x->cand[nc++] = (pd_cand){x->buf[j], c0 + j};
            if (nc == kk) { /* the threshold: the smallest of the first kk */
                npy_intp i;
                filt = kk < V;
                for (i = 0; i < nc; i++)
                    thr = i == 0 || x->cand[i].v < thr ? x->cand[i].v : thr;
            }
        }
        while (filt && (j = x->ops->next_gt(x->buf, j, n8, thr)) < len) {
            x->cand[nc++] = (pd_cand){x->buf[j], c0 + j};
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
    if (nc > kk)
        pd_select(x->cand, nc, kk);
    qsort(x->cand, (size_t)kk, sizeof(pd_cand), pd_cand_cmp);
    x->amax = x->cand[0].id;
    for (j = 0; j < kk; j++)
        x->sid[j] = x->cand[j].id;
    qsort(x->sid, (size_t)kk, sizeof(npy_intp), pd_id_cmp);

    /* 2: the exps and their sums; the running sum of a chunk's tail exps while the next
     * chunk's exps are computed */
    for (c = 0, j = 0; c < x->nch; c++) {
        int run = M && kk < V;
        npy_intp len = pd_sm_exps(x, row, c, m, &si, &cs, &cw, x->eb[c & 1], x->eb[(c + 1) & 1],
                                  run ? j : 0, &R);
        S += cs;
        W += cw;
        if (kk < V)
            T += x->ops->lanesum(x->eb[c & 1], (len + 7) & ~(npy_intp)7);
        if (run && c > 0)
            x->rend[c - 1] = R;
        j = len;
        if (run && c == x->nch - 1) {
            npy_intp i;
            for (i = 0; i < len; i++)
                R += x->eb[c & 1][i];
            x->rend[c] = R;
        }
    }
    ls = log1p(S);
    o->entropy[r] = ls - W / (1.0 + S);
    o->lp_min[r] = (mn - m) - ls;
    o->tail[r] = kk < V ? log(T) - ls : -INFINITY;
    for (j = 0; j < K; j++) {
        o->ids[r * K + j] = j < kk ? (int32_t)x->cand[j].id : -1;
        o->lps[r * K + j] = j < kk ? (float)((x->cand[j].v - m) - ls) : -INFINITY;
    }

    /* the probes: the first i with R_i > (j + 1/2)/M R */
    if (M) {
        npy_intp cur = -1, len = 0, pos;
        for (c = 0, j = 0; j < M; j++) {
            double q = ((double)j + 0.5) / (double)M * R, run = 0.0;
            if (kk >= V || !(R > 0)) {
                o->pids[r * M + j] = -1;
                o->plps[r * M + j] = -INFINITY;
                continue;
            }
            while (c < x->nch && !(x->rend[c] > q))
                c++;
            if (c == x->nch) {
                pos = V - 1; /* q rounded up to R (subnormal totals): as probe_positions */
            }
            else {
                npy_intp i = 0;
                if (cur != c) {
                    for (si = 0; si < kk && x->sid[si] < c * PD_SCH; si++)
                        ;
                    len = pd_sm_exps(x, row, c, m, &si, &cs, &cw, x->eb[0], NULL, 0, &run);
                    cur = c;
                }
                run = c > 0 ? x->rend[c - 1] : 0.0;
                for (; i < len - 1; i++) { /* the same sums as pass 2: run reaches rend[c] > q */
                    run += x->eb[0][i];
                    if (run > q)
                        break;
                }
                pos = c * PD_SCH + i;
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
    x->cand = malloc((size_t)x->cap * sizeof(pd_cand));
    x->sid = malloc((size_t)x->kk * sizeof(npy_intp));
    x->buf = malloc(3 * PD_SCH * sizeof(double));
    x->rend = malloc((size_t)x->nch * sizeof(double));
    x->eb[0] = x->buf ? x->buf + PD_SCH : NULL;
    x->eb[1] = x->buf ? x->buf + 2 * PD_SCH : NULL;
    if (!x->cand || !x->sid || !x->buf || !x->rend) {
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
    free(x->buf);
    free(x->rend);
}

int pd_summarize_run(pd_isa isa, const pd_mat *a, npy_intp k, npy_intp probes, int threads,
                     const pd_summary_out *out, npy_intp *bad_row, int *bad_kind)
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
    x.kk = k < a->V ? k : a->V;
    x.cap = x.kk + (x.kk > 256 ? x.kk : 256);
    x.nch = (a->V + PD_SCH - 1) / PD_SCH;
    x.out = out;
    return pd_run_rows(pd_sm_rows, &x, a->rows, threads, bad_row, bad_kind);
}
