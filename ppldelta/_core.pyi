from typing import Any, Literal, TypedDict

import numpy as np
import numpy.typing as npt

POSITIVE_TOLERANCE: float
BLOCK: int
QUALITIES: tuple[str, str, str, str]  # ('excellent', 'good', 'acceptable', 'poor')
QUALITY_THRESHOLDS: tuple[float, float, float]  # (1.0, 5.0, 10.0): rel < threshold[k] -> QUALITIES[k]

class PerplexityDelta(TypedDict):
    original_perplexity: float
    quantized_perplexity: float
    absolute_delta: float
    relative_delta_pct: float
    quality: Literal["excellent", "good", "acceptable", "poor"]

def perplexity_delta(
    original_log_probs: Any, quantized_log_probs: Any, *, positive_tolerance: float = ...
) -> PerplexityDelta: ...
def reference(sum_o: float, sum_q: float, n: int) -> PerplexityDelta: ...  # from exact sums
def quality(relative_delta_pct: float) -> Literal["excellent", "good", "acceptable", "poor"]: ...
def perplexity(log_probs: Any, *, positive_tolerance: float = ...) -> float: ...
def sum_log_probs(log_probs: Any, *, positive_tolerance: float = ...) -> tuple[int, float]: ...

class LogitsStats(tuple[Any, ...]):
    """Per-row results of logits_stats; None where not computed (a tuple of these 7 fields)."""

    n_fields: int
    @property
    def lp_a(self) -> npt.NDArray[np.float64] | None: ...  # log-softmax of a at the targets
    @property
    def lp_b(self) -> npt.NDArray[np.float64] | None: ...  # (NaN where ignored)
    @property
    def kld(self) -> npt.NDArray[np.float64] | None: ...  # KL(P||Q) per row
    @property
    def kld_rev(self) -> npt.NDArray[np.float64] | None: ...  # KL(Q||P)
    @property
    def same_top1(self) -> npt.NDArray[np.bool_] | None: ...
    @property
    def rank_b(self) -> npt.NDArray[np.int64] | None: ...  # #{j: b_j > b[argmax a]}
    @property
    def rank_a(self) -> npt.NDArray[np.int64] | None: ...  # #{j: a_j > a[argmax b]}

def logits_stats(
    a: npt.NDArray[Any],
    b: npt.NDArray[Any] | None = ...,
    targets: npt.NDArray[np.int64] | None = ...,
    ignore_index: int = ...,
    bf16: bool = ...,
    topk: bool = ...,
    threads: int = ...,
) -> LogitsStats: ...

class PairedMoments(tuple[Any, ...]):
    """Moments of paired log-probs o (original) and q (quantized), one read of each input.

    sum_o, sum_q: exactly rounded (math.fsum's; equal to sum_log_probs of each input): -inf when
    a term is -inf, NaN only with positive_tolerance=inf and both -inf and +inf terms.  The
    other sums are compensated float64 sums with IEEE semantics for infinite terms: o * q, dp
    and o - q are computed as IEEE doubles (a -inf log-prob makes o * o +inf, (-inf) * 0 NaN,
    exp(-inf) = 0), and a sum with an infinite term is that term's sum (inf, or NaN for
    inf - inf); none of this reaches sum_o or sum_q.
    """

    n_fields: int
    @property
    def n(self) -> int: ...
    @property
    def sum_o(self) -> float: ...
    @property
    def sum_q(self) -> float: ...
    @property
    def sum_oo(self) -> float: ...
    @property
    def sum_qq(self) -> float: ...
    @property
    def sum_oq(self) -> float: ...
    @property
    def sum_dp(self) -> float: ...  # dp = exp(q) - exp(o)
    @property
    def sum_dp2(self) -> float: ...
    @property
    def sum_dp4(self) -> float: ...
    @property
    def n_neginf_o(self) -> int: ...
    @property
    def n_neginf_q(self) -> int: ...
    @property
    def group_n(self) -> npt.NDArray[np.int64] | None: ...  # with codes
    @property
    def group_sum_o(self) -> npt.NDArray[np.float64] | None: ...  # exactly rounded per group
    @property
    def group_sum_q(self) -> npt.NDArray[np.float64] | None: ...
    @property
    def block_d(self) -> npt.NDArray[np.float64] | None: ...  # sums of o - q per block

def paired_moments(
    original_log_probs: Any,
    quantized_log_probs: Any,
    codes: npt.ArrayLike | None = ...,
    n_groups: int = ...,
    block_size: int = ...,
    positive_tolerance: float = ...,
) -> PairedMoments: ...

def summarize_rows(
    rows: Any, k: int, probes: int, offsets: npt.ArrayLike | None = ..., *, bf16: bool = ...,
    threads: int = ...
) -> dict[str, npt.NDArray[Any]]: ...  # entropy, tail, lp_min, ids, lps, pids, plps
def compare_rows(
    rows: Any, ids: npt.NDArray[np.int32], m: int, pids: npt.NDArray[np.int32] | None = ..., *,
    bf16: bool = ..., threads: int = ...
) -> dict[str, Any]: ...  # V, M, bS, bP, HQ, zq, bmax, nT, ninfT, QT, sbT, qbT, top, bot, Qbeyond, argmax_q, rank_q

def block_bootstrap(
    num: npt.ArrayLike, den: npt.ArrayLike, n_boot: int, seed: int
) -> npt.NDArray[np.float64]: ...
def segment_sums(
    codes: npt.ArrayLike, n_groups: int, values: npt.ArrayLike
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]: ...
def simd() -> str: ...
def supported_simd() -> list[str]: ...
def _set_simd(name: str) -> None: ...
def _round4(x: float) -> float: ...
def _runsum(values: npt.ArrayLike, start: float) -> tuple[float, np.ndarray]: ...
def _path_counts() -> tuple[int, int, int]: ...  # (fast, exact, superaccumulator) passes
