/* Run-time choice of the instruction set: the one place that decides which kernel runs.
 *
 * The best ISA the CPU *and the OS* support is chosen at module exec (AVX needs XCR0 to enable
 * the YMM state, AVX-512 also the opmask and ZMM states: checking CPUID alone is not enough).
 * PPLDELTA_SIMD=scalar|sse2|avx2|avx512|neon caps the choice (for tests and bug reports);
 * _core._set_simd() does the same at run time.  A dtype without a kernel at the chosen ISA
 * falls back to the next lower ISA that has one, ending at the portable C kernels.
 */
#include "common.h"
#include <stdlib.h>

#ifdef PD_X86
#include <cpuid.h>
#endif

const char *const pd_isa_names[PD_NISA] = {"scalar", "sse2", "avx2", "avx512", "neon"};

/* Every ISA's kernel tables, in one place (NULL where this build has none). */
static const struct {
    const pd_kernels *reduce;
    const pd_logits_kernels *logits;
} pd_tables[PD_NISA] = {
    [PD_ISA_SCALAR] = {&pd_kernels_scalar, &pd_logits_scalar},
#ifdef PD_X86
    [PD_ISA_SSE2] = {&pd_kernels_sse2, &pd_logits_sse2},
    [PD_ISA_AVX2] = {&pd_kernels_avx2, &pd_logits_avx2},
    [PD_ISA_AVX512] = {&pd_kernels_avx512, &pd_logits_avx512},
#endif
#ifdef PD_NEON
    [PD_ISA_NEON] = {&pd_kernels_neon, NULL},
#endif
};

static const pd_kernels *pd_table(pd_isa isa) { return pd_tables[isa].reduce; }
static const pd_logits_kernels *pd_logits_table(pd_isa isa) { return pd_tables[isa].logits; }

#ifdef PD_X86
static uint64_t pd_xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
#endif

int pd_isa_supported(pd_isa isa)
{
    switch (isa) {
    case PD_ISA_SCALAR: return 1;
#ifdef PD_X86
    case PD_ISA_SSE2: {
        unsigned a, b, c, d;
        return __get_cpuid(1, &a, &b, &c, &d) && (d & (1u << 26));
    }
    case PD_ISA_AVX2:
    case PD_ISA_AVX512: {
        unsigned a, b, c, d;
        uint64_t xcr0;
        if (!__get_cpuid(1, &a, &b, &c, &d))
            return 0;
        /* OSXSAVE (27), AVX (28), F16C (29) */
        if ((c & (7u << 27)) != (7u << 27))
            return 0;
        xcr0 = pd_xgetbv0();
        if ((xcr0 & 0x6) != 0x6) /* XMM and YMM state */
            return 0;
        if (!(c & (1u << 12))) /* FMA, used by the AVX2 and AVX-512 exp */
            return 0;
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
            return 0;
        if (isa == PD_ISA_AVX2)
            return (b >> 5) & 1;
        /* AVX512F (bit 16), AVX2 (its kernels also use 256-bit integer ops) and the
         * opmask/ZMM_Hi256/Hi16_ZMM state (XCR0 bits 5-7) */
        return ((b >> 16) & 1) && ((b >> 5) & 1) && (xcr0 & 0xe0) == 0xe0;
    }
#endif
#ifdef PD_NEON
    case PD_ISA_NEON: return 1;
#endif
    default: return 0;
    }
}

/* The active ISA.  Written at module exec and by _set_simd (a test hook); kernels read the
 * table through pd_reduce_kernel, so a concurrent switch only changes which correct kernel a
 * call gets. */
static volatile pd_isa pd_active = PD_ISA_SCALAR;

static pd_isa pd_best(pd_isa cap)
{
    int i;
    for (i = (int)cap; i > 0; i--)
        if (pd_table((pd_isa)i) && pd_isa_supported((pd_isa)i))
            return (pd_isa)i;
    return PD_ISA_SCALAR;
}

int pd_dispatch_set(pd_isa isa)
{
    if ((int)isa < 0 || isa >= PD_NISA || !pd_table(isa) || !pd_isa_supported(isa)) {
        PyErr_Format(PyExc_ValueError, "SIMD path '%s' is not available on this CPU/build",
                     ((int)isa >= 0 && isa < PD_NISA) ? pd_isa_names[isa] : "?");
        return -1;
    }
    pd_active = isa;
    return 0;
}

pd_isa pd_dispatch_current(void) { return pd_active; }

int pd_dispatch_init(void)
{
    const char *env = getenv("PPLDELTA_SIMD");
    int i;
    if (env == NULL || env[0] == '\0') {
        pd_active = pd_best((pd_isa)(PD_NISA - 1));
        return 0;
    }
    for (i = 0; i < PD_NISA; i++) {
        if (strcmp(env, pd_isa_names[i]) == 0) {
            /* Pin to the requested path if it can run, else the best one below it. */
            pd_active = pd_best((pd_isa)i);
            return 0;
        }
    }
    {
        char names[128] = "";
        size_t len = 0;
        for (i = 0; i < PD_NISA; i++)
            len += (size_t)PyOS_snprintf(names + len, sizeof names - len, "%s%s", i ? ", " : "",
                                         pd_isa_names[i]);
        PyErr_Format(PyExc_ValueError, "PPLDELTA_SIMD=%s is not one of %s", env, names);
    }
    return -1;
}

const pd_logits_fns *pd_logits_kernel(pd_dtype dt)
{
    int i;
    for (i = (int)pd_active; i > 0; i--) {
        const pd_logits_kernels *k = pd_logits_table((pd_isa)i);
        if (k && k->fns[dt].lse)
            return &k->fns[dt];
    }
    return &pd_logits_scalar.fns[dt];
}

pd_reduce_fn pd_reduce_kernel(pd_dtype dt, int mode)
{
    int i;
    if (mode == PD_MODE_SACC)
        return pd_reduce_sacc[dt];
    for (i = (int)pd_active; i >= 0; i--) {
        const pd_kernels *k = pd_table((pd_isa)i);
        pd_reduce_fn f = k ? (mode ? k->reduce_exact[dt] : k->reduce[dt]) : NULL;
        if (f)
            return f;
    }
    return mode ? pd_kernels_scalar.reduce_exact[dt] : pd_kernels_scalar.reduce[dt];
}
