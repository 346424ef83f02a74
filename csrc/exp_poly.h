/* The float32 exp of the SIMD logits kernels (logits_sse2.c, logits_avx2.c, logits_avx512.c):
 * its constants, in one place.  Cephes-style: x = n ln2 + r with n = round(x log2(e)) and ln2
 * split in two (LN2_HI has few bits, so n * LN2_HI is exact), exp(r) ~ 1 + r + r^2 P(r) with the
 * degree-5 polynomial P below (Horner from P5), then 2^n through the exponent bits.  Inputs are
 * x - max <= 0; below PD_EXP_MIN (including -inf) the result is exactly 0, so masked-out tokens
 * contribute nothing.  About 1.3 ulp. */
#ifndef PPLDELTA_EXP_POLY_H
#define PPLDELTA_EXP_POLY_H

#define PD_EXP_MIN (-87.3f)
#define PD_EXP_LOG2E 1.44269504088896341f
#define PD_EXP_LN2_HI 0.693359375f
#define PD_EXP_LN2_LO (-2.12194440e-4f)
#define PD_EXP_P5 1.9875691500e-4f
#define PD_EXP_P4 1.3981999507e-3f
#define PD_EXP_P3 8.3334519073e-3f
#define PD_EXP_P2 4.1665795894e-2f
#define PD_EXP_P1 1.6666665459e-1f
#define PD_EXP_P0 5.0000001201e-1f

#endif
