/* The float32 exp of the SIMD logits kernels: its constants and its error budget, in one place.
 *
 * AVX2 / AVX-512 (logits_avx2.c, logits_avx512.c), 11 vector operations with FMA:
 *   t = x log2(e) + PD_EXP_SHIFT        (one FMA rounds x log2(e) to the integer n; the low bits
 *   n = t - PD_EXP_SHIFT                 of t are n + 127, the exponent field of 2^n for AVX2)
 *   r = x - n LN2 - n LN2_TAIL          (two FMAs: ln 2 to 2^-53, |r| <= ln2/2 + 2^-17)
 *   p = 1 + r (1 + r (C2 + r (C3 + r (C4 + r (C5 + r C6)))))   (6 FMAs, Horner)
 *   exp(x) ~ p 2^n                      (vscalefps; AVX2: p times the bits (t << 23))
 * AVX2 first clamps x at PD_EXP_MIN (NaN stays NaN; x < PD_EXP_MIN gives 1.2e-38 instead of 0);
 * AVX-512 needs no clamp (vscalefps makes 2^n for n < -126) and returns NaN for NaN and -inf,
 * which the template sends to pd_f_exp0 (clamped, exactly 0 below PD_EXP_MIN).
 * C2..C6 minimise the relative error of 1 + r + r^2 q(r) against e^r on [-ln2/2, ln2/2] (a linear
 * programme on 6001 points: 3.1e-9), rounded to float32 and then nudged by an ulp or two to
 * minimise the bias of float32 evaluation over every sub-interval of width 0.1.  Measured on
 * 3*10^5 points with float32 FMA arithmetic: max relative error 6.2e-8 (0.5 ulp), mean 1.5e-10,
 * largest mean over a sub-interval 2.7e-9.  p(0) = 1 exactly, so the row maximum weighs 1.
 *
 * Why this accuracy and not less (the statistics' error budget; logits_template.h sums):
 * - Per exp, relative error d_j <= 6.2e-8 (polynomial and rounding) + 6e-8 |x_j| (x_j = logit -
 *   max rounded to float32, not the exp's doing).  The row sum S = sum e_j is summed in float32
 *   lanes of at most k = 32 (lse) or 64 (KL) terms per chunk, then in float64: at most
 *   (k - 1) 2^-24 <= 3.8e-6 relative (typically sqrt(k) 2^-25 <= 2.4e-7).  So the error of
 *   lse = max + log S is at most 6.2e-8 + 6e-8 E_p|x| + 3.8e-6 <= 4.6e-6 (E_p|x| = max - lse +
 *   H(p) <= log V = 12 for V = 152k), under the 1e-5 that tests/test_logits.py pins.
 * - Rounding errors average out over tokens; a bias of the polynomial does not: a perplexity is
 *   exp(-mean log-prob), and tests/test_hf.py pins it to 1e-8 relative against float64 on rows
 *   of a near-uniform 150-token vocabulary (every x_j in [-0.6, 0], one narrow part of the
 *   reduction interval).  That rules out what would otherwise do: a degree-5 minimax (1.2e-7,
 *   one FMA fewer) is biased by up to ~4e-8 over such sub-intervals, a 2^(k/32) table with a
 *   degree-2 or 3 polynomial carries the table's float32 rounding (up to 6e-8, fixed per entry),
 *   and one ln2 constant biases every exp by +1.9e-9 |n|.  Measured means over the test's
 *   tokens: 0.5e-9 to 2e-9 (this exp), 0.9e-8 to 3.4e-8 (those).
 * - KL = w/S_a - lse_a + lse_b moves by Cov_p(d, a - b) - E_p d + E_q d: |d| times the spread of
 *   a - b, plus the float32 sums of e_j (a_j - b_j): an absolute floor of about 1e-7 nats.
 * The float64 path (PPLDELTA_SIMD=scalar) has none of these.
 *
 * SSE2 (logits_sse2.c, no FMA) keeps the Cephes form: ln2 split in two (LN2_HI has few bits, so
 * n LN2_HI is exact without FMA), exp(r) ~ 1 + r + r^2 P(r) with the degree-5 P below, and a
 * clamp plus a mask (exactly 0 below PD_EXP_MIN, also for NaN: its max pass looks for NaN). */
#ifndef PPLDELTA_EXP_POLY_H
#define PPLDELTA_EXP_POLY_H

#define PD_EXP_MIN (-87.3f)
#define PD_EXP_LOG2E 1.44269504088896341f
#define PD_EXP_SHIFT 12583039.0f /* 1.5 * 2^23 + 127 */
#define PD_EXP_LN2 0x1.62e430p-1f /* ln 2 = PD_EXP_LN2 + PD_EXP_LN2_TAIL to 2^-53 */
#define PD_EXP_LN2_TAIL (-0x1.05c610p-29f)
#define PD_EXP_C2 0x1.fffffcp-2f
#define PD_EXP_C3 0x1.555494p-3f
#define PD_EXP_C4 0x1.5558f0p-5f
#define PD_EXP_C5 0x1.123a6cp-7f
#define PD_EXP_C6 0x1.6a2352p-10f

/* SSE2 */
#define PD_EXP_LN2_HI 0.693359375f
#define PD_EXP_LN2_LO (-2.12194440e-4f)
#define PD_EXP_P5 1.9875691500e-4f
#define PD_EXP_P4 1.3981999507e-3f
#define PD_EXP_P3 8.3334519073e-3f
#define PD_EXP_P2 4.1665795894e-2f
#define PD_EXP_P1 1.6666665459e-1f
#define PD_EXP_P0 5.0000001201e-1f

#endif
