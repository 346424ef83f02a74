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

/* Compensated float64 accumulator of a sum of log-probabilities: hi + lo + lolo.
 * hi is the running sum, lo collects the exact Neumaier errors of hi, and lolo the exact TwoSum
 * errors of lo, so terms that even lo cannot hold (a 1e-47 next to 64.7) still decide how the
 * final value rounds (see pd_acc_value).  A -inf term (or an overflow of the running sum, which
 * implies a mean so negative that exp(-mean) overflows anyway) is recorded in `neginf`, so that
 * the compensation never sees inf - inf. */
typedef struct {
    double hi;
    double lo;
    double lolo;
    int neginf;  /* a -inf term, or an overflow towards -inf */
    int posinf;  /* likewise towards +inf (only when positive values are allowed) */
    int inexact; /* some rounding error was dropped (lane error terms, lolo): see PD_EXACT_ERR */
} pd_acc;

#define PD_ACC_ZERO {0.0, 0.0, 0.0, 0, 0, 0}

/* Knuth's TwoSum: s + e == a + b exactly. */
static inline void pd_two_sum(double a, double b, double *s, double *e)
{
    double t = a + b, bp = t - a;
    *e = (a - (t - bp)) + (b - bp);
    *s = t;
}

static inline void pd_acc_add(pd_acc *a, double x)
{
    double t = a->hi + x, err, e2, e3;
    if (isinf(t)) { /* x == +-inf, or the sum overflowed (hi itself is always finite) */
        if (t > 0)
            a->posinf = 1;
        else
            a->neginf = 1;
        return;
    }
    err = fabs(a->hi) >= fabs(x) ? (a->hi - t) + x : (x - t) + a->hi;
    a->hi = t;
    pd_two_sum(a->lo, err, &a->lo, &e2);
    pd_two_sum(a->lolo, e2, &a->lolo, &e3);
    a->inexact |= e3 != 0.0;
}

/* The exactly rounded sum of three doubles (CPython's math.fsum on them: Shewchuk's
 * non-overlapping partials, then the half-way correction), so cancellation between hi, lo and
 * lolo cannot misround. */
static inline double pd_fsum3(double x0, double x1, double x2)
{
    double p[4], xs[3] = {x0, x1, x2}, hi = 0.0, lo = 0.0;
    int n = 0, i, j, k;
    for (k = 0; k < 3; k++) {
        double x = xs[k];
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
    return hi;
}

static inline double pd_acc_value(const pd_acc *a)
{
    if (a->neginf && a->posinf)
        return NAN;
    if (a->neginf)
        return -INFINITY;
    if (a->posinf)
        return INFINITY;
    return pd_fsum3(a->hi, a->lo, a->lolo);
}

/* Merge b into a (for partial sums computed separately). */
static inline void pd_acc_merge(pd_acc *a, const pd_acc *b)
{
    a->neginf |= b->neginf;
    a->posinf |= b->posinf;
    pd_acc_add(a, b->hi);
    pd_acc_add(a, b->lo);
    pd_acc_add(a, b->lolo);
    a->inexact |= b->inexact;
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

#define PD_BLOCK 1024

/* Error bound of the fast kernels: |sum - exact| <= PD_FAST_ERR * sum|x|.  A lane adds at most
 * PD_BLOCK/(4 W) values (the scalar kernel: 256), the horizontal sum and the scalar tail (< W,
 * at most 7 for AVX-512) fewer than 16 more, and the Neumaier fold and final rounding 2:
 * gamma_{256+16+2} bounds every path (the worst measured is 261 roundings). */
#define PD_FAST_ERR ((PD_BLOCK / 4 + 18) * 1.1102230246251565e-16)

/* Error bound of the exact kernels when acc.inexact is set: a lane's TwoSum error terms (each
 * <= eps * sum|x| of the lane) are added with rounding, PD_BLOCK/4 of them: gamma^2, doubled
 * for margin.  When acc.inexact is clear, hi + lo + lolo is the exact sum. */
#define PD_EXACT_ERR (2.0 * PD_FAST_ERR * PD_FAST_ERR)

/* Element loads shared by the kernels (memcpy: unaligned and strict-aliasing safe). */
static inline double pd_load_f64(const char *p) { double v; memcpy(&v, p, sizeof v); return v; }
static inline double pd_load_f32(const char *p) { float v; memcpy(&v, p, sizeof v); return v; }

/* IEEE binary16 -> double, exact (normals, subnormals, inf, NaN). */
static inline double pd_half_to_double(uint16_t h)
{
    uint32_t sign = (uint32_t)(h >> 15), exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    double v;
    if (exp == 0)
        v = ldexp((double)man, -24);
    else if (exp == 31)
        v = man ? NAN : INFINITY;
    else
        v = ldexp((double)(man | 0x400), (int)exp - 25);
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
    pd_isa isa;
    const char *name;
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
npy_intp pd_reduce_strided(pd_dtype dt, int exact, const char *p, npy_intp n, npy_intp stride,
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
    pd_isa isa;
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
pd_reduce_fn pd_reduce_kernel(pd_dtype dt, int exact); /* contiguous kernel, active ISA */
const pd_logits_fns *pd_logits_kernel(pd_dtype dt);    /* row kernels, active ISA */

#endif
