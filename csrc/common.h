/* Shared declarations of the ppldelta C core.
 *
 * Every translation unit includes this header.  Only module.c imports the NumPy C API table
 * (PY_ARRAY_UNIQUE_SYMBOL); the others see it through NO_IMPORT_ARRAY.  We compile against
 * NumPy 2.x headers and target the 1.x ABI (NPY_TARGET_VERSION), so one binary runs with
 * NumPy 1.23+ and 2.x.
 */
#ifndef PPLDELTA_COMMON_H
#define PPLDELTA_COMMON_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define NPY_NO_DEPRECATED_API NPY_1_23_API_VERSION
#define NPY_TARGET_VERSION NPY_1_23_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL ppldelta_ARRAY_API
#ifndef PPLDELTA_IMPORT_ARRAY
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>
#include <numpy/npy_2_compat.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------------
 * Element types the kernels read natively.  Anything else (byte-swapped, integer, bool,
 * long double) is cast on the fly to float64 in small buffers by NpyIter and fed to the
 * float64 kernel.
 */
typedef enum { PD_F64 = 0, PD_F32 = 1, PD_F16 = 2, PD_BF16 = 3, PD_NDTYPES = 4 } pd_dtype;

/* Exact superaccumulator: a fixed-point integer in radix-2^32 digits (int64, so carries can
 * wait), unit 2^-1074, wide enough for any sum of up to 2^62 finite doubles.  A double
 * m * 2^(p - 1074) (53-bit m, p in [0, 2045]) adds m << (p % 32) to three consecutive digits
 * from p / 32; every PD_SACC_CARRY additions the carries are propagated, so no digit's magnitude
 * exceeds 2^32 + 2^62.  pd_sacc_value rounds the total once, to nearest even (math.fsum's
 * result, including totals beyond DBL_MAX: +-inf).  Memory: 584 bytes, whatever n is. */
#define PD_SACC_DIGITS 72
#define PD_SACC_CARRY ((int64_t)1 << 30)
typedef struct {
    int64_t d[PD_SACC_DIGITS];
    int64_t pending;
} pd_sacc;

void pd_sacc_norm(pd_sacc *s); /* exact.c */
double pd_sacc_value(pd_sacc *s);

static inline void pd_sacc_add(pd_sacc *s, double x) /* x finite */
{
    uint64_t b, m, lo, rest;
    int ex, p, k;
    memcpy(&b, &x, sizeof b);
    ex = (int)((b >> 52) & 0x7ff);
    m = b & 0xfffffffffffffULL;
    p = ex ? ex - 1 : 0;
    if (ex)
        m |= 1ULL << 52;
    k = p >> 5;
    lo = (m << (p & 31)) & 0xffffffffULL;
    rest = m >> (32 - (p & 31));
    if (b >> 63) {
        s->d[k] -= (int64_t)lo;
        s->d[k + 1] -= (int64_t)(rest & 0xffffffffULL);
        s->d[k + 2] -= (int64_t)(rest >> 32);
    }
    else {
        s->d[k] += (int64_t)lo;
        s->d[k + 1] += (int64_t)(rest & 0xffffffffULL);
        s->d[k + 2] += (int64_t)(rest >> 32);
    }
    if (++s->pending == PD_SACC_CARRY)
        pd_sacc_norm(s);
}

/* Compensated float64 accumulator of a sum of log-probabilities: hi + lo + lolo, plus a
 * rigorous bound err on |exact sum - (hi + lo + lolo)|.
 * hi is the running sum, lo collects the exact Neumaier errors of hi, and lolo the exact TwoSum
 * errors of lo; the TwoSum error e3 of lolo is dropped and |e3| added to err.  Infinite terms
 * are recorded in neginf/posinf (the sum is then known: -inf, +inf, or NaN for both), an
 * overflow of the running sum of finite terms in `overflow` (the triple is then meaningless
 * and only the superaccumulator can tell the total).  With sacc set, the reduction kernels
 * (mode 2) add every finite value to that superaccumulator instead. */
typedef struct {
    double hi;
    double lo;
    double lolo;
    double err;
    int neginf; /* a -inf term (or a NaN term: segment sums do not validate; both flags) */
    int posinf; /* a +inf term (only when positive values are allowed) */
    int overflow;
    pd_sacc *sacc;
} pd_acc;

#define PD_ACC_ZERO {0.0, 0.0, 0.0, 0.0, 0, 0, 0, NULL}

/* A rigorous upper bound on y >= 0, given fl(y) (one rounding to nearest, no overflow): if y
 * is normal, fl(y) >= y (1 - u) and (1 + 4u)(1 - u)^2 > 1 + u covers the product's rounding
 * and, as u y >= 2^-1075, a subnormal rounding of a term of y; if fl(y) is subnormal, the
 * addition was exact and 2^-1074 covers one subnormal rounding of a product inside y. */
static inline double pd_up(double y) { return y * (1.0 + 0x1p-51) + 0x1p-1074; }

/* Knuth's TwoSum: s + e == a + b exactly (any finite a, b whose sum does not overflow). */
static inline void pd_two_sum(double a, double b, double *s, double *e)
{
    double t = a + b, bp = t - a;
    *e = (a - (t - bp)) + (b - bp);
    *s = t;
}

/* Neumaier's compensated sum s + c of float64 terms of either sign (the bootstrap's ratios, the
 * paired moments): error about eps |S| + n eps^2 sum|x|.  pd_csum_value keeps IEEE semantics
 * for non-finite terms (an infinite s is the result; c is then meaningless). */
typedef struct {
    double s, c;
} pd_csum;

static inline void pd_csum_add(pd_csum *a, double x)
{
    double t = a->s + x;
    a->c += fabs(a->s) >= fabs(x) ? (a->s - t) + x : (x - t) + a->s;
    a->s = t;
}

static inline double pd_csum_value(const pd_csum *a) { return isfinite(a->s) ? a->s + a->c : a->s; }

static inline void pd_acc_add(pd_acc *a, double x)
{
    double t = a->hi + x, err, e2, e3;
    if (!isfinite(x)) {
        a->neginf |= !(x > 0);
        a->posinf |= !(x < 0);
        return;
    }
    if (isinf(t)) { /* finite terms overflowed */
        a->overflow = 1;
        return;
    }
    /* Fast2Sum with |larger| first: hi + x == t + err exactly */
    err = fabs(a->hi) >= fabs(x) ? (a->hi - t) + x : (x - t) + a->hi;
    a->hi = t;
    pd_two_sum(a->lo, err, &a->lo, &e2);
    pd_two_sum(a->lolo, e2, &a->lolo, &e3);
    if (e3 != 0.0)
        a->err = pd_up(a->err + fabs(e3));
}

/* The exactly rounded sum of k <= 4 doubles (CPython's math.fsum on them: Shewchuk's
 * non-overlapping partials, then the half-way correction), valid when no partial overflows. */
static inline double pd_fsum(const double *xs, int k)
{
    double p[4], hi = 0.0, lo = 0.0;
    int n = 0, i, j, q;
    for (q = 0; q < k; q++) {
        double x = xs[q];
        for (i = j = 0; j < n; j++) {
            double y = p[j], h, l;
            if (fabs(x) < fabs(y)) {
                double t = x;
                x = y;
                y = t;
            }
            h = x + y;
            l = y - (h - x);
            if (l != 0.0)
                p[i++] = l;
            x = h;
        }
        n = i;
        p[n++] = x;
    }
    if (n > 0) {
        hi = p[--n];
        while (n > 0) {
            double x = hi, y = p[--n], yr;
            hi = x + y;
            yr = hi - x;
            lo = y - yr;
            if (lo != 0.0)
                break;
        }
        if (n > 0 && ((lo < 0.0 && p[n - 1] < 0.0) || (lo > 0.0 && p[n - 1] > 0.0))) {
            double y = lo * 2.0, x = hi + y, yr = x - hi;
            if (y == yr)
                hi = x;
        }
    }
    return hi + 0.0; /* an exact zero is +0.0, as math.fsum gives */
}

/* The sum is known from infinite terms alone. */
static inline int pd_acc_inf(const pd_acc *a) { return a->neginf || a->posinf; }

/* Best value of the accumulator: exact when pd_acc_exact certifies it; NaN after an overflow. */
static inline double pd_acc_value(const pd_acc *a)
{
    double t[3] = {a->hi, a->lo, a->lolo};
    if (a->neginf && a->posinf)
        return NAN;
    if (pd_acc_inf(a))
        return a->neginf ? -INFINITY : INFINITY;
    return a->overflow ? NAN : pd_fsum(t, 3);
}

/* The certificate.  Claim: when it returns 1, *v is the exactly rounded sum of every term
 * added to a (what math.fsum returns).
 * Proof.  With an infinite term the sum is +-inf or NaN, as recorded.  Otherwise no overflow
 * occurred, so every TwoSum/Fast2Sum above was exact and the exact sum S satisfies
 * |S - T| <= err for the real T = hi + lo + lolo: pd_acc_add drops only e3 and adds a bound
 * of |e3| to err (pd_up), and a reduction kernel adds to err a bound of everything its lanes
 * drop (reduce_template.h).  |hi| + |lo| + |lolo| + err < 2^1023 keeps every partial of
 * pd_fsum finite, so lo_v = pd_fsum(T - err) and hi_v = pd_fsum(T + err) are the exactly
 * rounded values of T - err and T + err.  Rounding to nearest is monotone and
 * T - err <= S <= T + err, so round(S) lies between lo_v and hi_v: when they are equal,
 * round(S) is that value.  (err = 0, the usual case, gives lo_v = hi_v = round(T) = round(S).)
 * (It applies to accumulators filled by pd_acc_add and the exact kernels; the fast kernels keep
 * no err, their error is bounded by PD_FAST_ERR.)  When it returns 0, the caller sums the raw
 * values again with the superaccumulator. */
static inline int pd_acc_exact(const pd_acc *a, double *v)
{
    double t[4] = {a->hi, a->lo, a->lolo, -a->err}, lo_v, hi_v;
    if (pd_acc_inf(a)) {
        *v = pd_acc_value(a);
        return 1;
    }
    if (a->overflow || !(fabs(a->hi) + fabs(a->lo) + fabs(a->lolo) + a->err < 0x1p1023))
        return 0;
    lo_v = pd_fsum(t, 4);
    if (a->err == 0.0) {
        *v = lo_v;
        return 1;
    }
    t[3] = a->err;
    hi_v = pd_fsum(t, 4);
    *v = lo_v;
    return lo_v == hi_v;
}

/* A reduction kernel sums n values at p (stride in bytes; contiguous kernels are only called
 * with stride == itemsize) into acc and checks them on the way: it returns -1 when every value
 * is a number <= tol, or else the index of the first NaN or value > tol, leaving acc undefined.
 * Kernels add plain float64 lane sums over blocks of PD_BLOCK elements and fold each block sum
 * into acc with Neumaier compensation: a block's partial sums of float32 inputs are exact in
 * practice (24-bit mantissas in a 53-bit accumulator), and the error of the whole reduction is
 * O(eps * sum|x|) independent of n. */
typedef npy_intp (*pd_reduce_fn)(const char *p, npy_intp n, npy_intp stride, double tol,
                                 pd_acc *acc);

/* Modes of the reductions: plain lane sums (fast), TwoSum lanes with an error bound (exact),
 * and the superaccumulator over the raw values (acc->sacc set; exact.c, one kernel per dtype
 * for every ISA, any stride). */
enum { PD_MODE_FAST = 0, PD_MODE_EXACT = 1, PD_MODE_SACC = 2 };
extern const pd_reduce_fn pd_reduce_sacc[PD_NDTYPES];

#define PD_BLOCK 1024

/* Error bound of the fast kernels: |sum - exact| <= PD_FAST_ERR * sum|x|.  A lane adds at most
 * PD_BLOCK/(4 W) values (the scalar kernel: 256), the horizontal sum and the scalar tail (< W,
 * at most 7 for AVX-512) fewer than 16 more, and the Neumaier fold and final rounding 2:
 * gamma_{256+16+2} bounds every path (the worst measured is 261 roundings). */
#define PD_FAST_ERR ((PD_BLOCK / 4 + 18) * 1.1102230246251565e-16)

/* Element loads shared by the kernels (memcpy: unaligned and strict-aliasing safe). */
static inline double pd_load_f64(const char *p) { double v; memcpy(&v, p, sizeof v); return v; }
static inline double pd_load_f32(const char *p) { float v; memcpy(&v, p, sizeof v); return v; }

/* IEEE binary16 -> double, exact (normals, subnormals, inf, NaN). */
static inline double pd_half_to_double(uint16_t h)
{
    uint32_t sign = (uint32_t)(h >> 15), exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    double v;
    if (exp == 0)
        v = (double)man * 0x1p-24; /* subnormal: exact */
    else if (exp == 31)
        v = man ? NAN : INFINITY;
    else { /* normal: the same exponent and significand in double's fields (no libm ldexp) */
        uint64_t b = ((uint64_t)(exp + 1008) << 52) | ((uint64_t)man << 42);
        memcpy(&v, &b, sizeof v);
    }
    return sign ? -v : v;
}
static inline double pd_load_f16(const char *p) { uint16_t h; memcpy(&h, p, 2); return pd_half_to_double(h); }

/* bfloat16 -> double, exact: the upper half of a float32. */
static inline double pd_bf16_to_double(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline double pd_load_bf16(const char *p) { uint16_t h; memcpy(&h, p, 2); return pd_bf16_to_double(h); }

/* The one dtype switch: NumPy type -> pd_dtype (native byte order assumed by the caller; 16-bit
 * integers are bfloat16 bits only when the caller says so), element sizes, scalar loads. */
static inline int pd_dtype_of(int type_num, int bf16, pd_dtype *dt)
{
    if (bf16)
        return (type_num == NPY_UINT16 || type_num == NPY_INT16) ? (*dt = PD_BF16, 1) : 0;
    switch (type_num) {
    case NPY_DOUBLE: *dt = PD_F64; return 1;
    case NPY_FLOAT: *dt = PD_F32; return 1;
    case NPY_HALF: *dt = PD_F16; return 1;
    default: return 0;
    }
}

static const npy_intp pd_itemsize[PD_NDTYPES] = {8, 4, 2, 2};

static inline double pd_load(pd_dtype dt, const char *p)
{
    switch (dt) {
    case PD_F64: return pd_load_f64(p);
    case PD_F32: return pd_load_f32(p);
    case PD_F16: return pd_load_f16(p);
    default: return pd_load_bf16(p);
    }
}

/* True when a value fails validation: NaN or above the tolerance. */
static inline int pd_is_bad(double x, double tol) { return !(x <= tol); }

/* ---------------------------------------------------------------------------------------------
 * Instruction sets and the dispatch table (dispatch.c is the only place that chooses).
 */
typedef enum {
    PD_ISA_SCALAR = 0,
    PD_ISA_SSE2 = 1,
    PD_ISA_AVX2 = 2,
    PD_ISA_AVX512 = 3,
    PD_ISA_NEON = 4,
    PD_NISA = 5
} pd_isa;

typedef struct {
    pd_reduce_fn reduce[PD_NDTYPES];       /* contiguous input, plain lane sums */
    pd_reduce_fn reduce_exact[PD_NDTYPES]; /* contiguous input, TwoSum lanes (double-double) */
    /* (no bfloat16 reductions: torch's bf16 log-prob vectors are widened by the adapter) */
} pd_kernels;

extern const char *const pd_isa_names[PD_NISA];

/* Per-ISA kernel tables; an entry is NULL where that ISA has no kernel for the dtype (the
 * dispatcher then falls back to the next lower ISA). */
extern const pd_kernels pd_kernels_scalar;
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
/* GCC/Clang: cpuid.h, target attributes.  Other compilers (MSVC) build the portable kernels. */
#define PD_X86 1
extern const pd_kernels pd_kernels_sse2;
extern const pd_kernels pd_kernels_avx2;
extern const pd_kernels pd_kernels_avx512;
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#define PD_NEON 1
extern const pd_kernels pd_kernels_neon;
#endif

/* The portable strided kernel (any stride, including 0 and negative). */
npy_intp pd_reduce_strided(pd_dtype dt, int mode, const char *p, npy_intp n, npy_intp stride,
                           double tol, pd_acc *acc);

/* ---------------------------------------------------------------------------------------------
 * Logits row kernels (logits_template.h): log-sum-exp and argmax of a row; KL divergence both
 * ways between two rows; how many values of a row exceed a threshold (top-k membership).
 * They return -1 when a row holds NaN or +inf.
 */
typedef struct {
    double lse_a, lse_b, kld, kld_rev;
    npy_intp argmax_a, argmax_b;
} pd_kl_row;

typedef int (*pd_lse_fn)(const char *row, npy_intp V, double *lse, npy_intp *argmax);
typedef int (*pd_kl_fn)(const char *ra, const char *rb, npy_intp V, pd_kl_row *r);
typedef npy_intp (*pd_count_gt_fn)(const char *row, npy_intp V, double thr);

typedef struct {
    pd_lse_fn lse;
    pd_kl_fn kl;
    pd_count_gt_fn count_gt;
} pd_logits_fns;

typedef struct {
    pd_logits_fns fns[PD_NDTYPES]; /* contiguous rows; {NULL} where the ISA has none */
} pd_logits_kernels;

extern const pd_logits_kernels pd_logits_scalar;
#ifdef PD_X86
extern const pd_logits_kernels pd_logits_sse2;
extern const pd_logits_kernels pd_logits_avx2;
extern const pd_logits_kernels pd_logits_avx512;
#endif

/* dispatch.c */
int pd_isa_supported(pd_isa isa);      /* CPU (and OS) support */
int pd_dispatch_init(void);            /* reads PPLDELTA_SIMD; 0 or -1 with an exception */
int pd_dispatch_set(pd_isa isa);       /* 0, or -1 with ValueError if unsupported */
pd_isa pd_dispatch_current(void);
pd_reduce_fn pd_reduce_kernel(pd_dtype dt, int mode); /* contiguous kernel, active ISA */
const pd_logits_fns *pd_logits_kernel(pd_dtype dt);    /* row kernels, active ISA */

#endif
