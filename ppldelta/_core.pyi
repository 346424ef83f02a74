from typing import Any, Literal, TypedDict

import numpy as np
import numpy.typing as npt

POSITIVE_TOLERANCE: float
BLOCK: int

class PerplexityDelta(TypedDict):
    original_perplexity: float
    quantized_perplexity: float
    absolute_delta: float
    relative_delta_pct: float
    quality: Literal["excellent", "good", "acceptable", "poor"]

def perplexity_delta(
    original_log_probs: Any, quantized_log_probs: Any, *, positive_tolerance: float = ...
) -> PerplexityDelta: ...
def perplexity(log_probs: Any, *, positive_tolerance: float = ...) -> float: ...
def sum_log_probs(log_probs: Any, *, positive_tolerance: float = ...) -> tuple[int, float]: ...
def logits_stats(
    a: npt.NDArray[Any],
    b: npt.NDArray[Any] | None = ...,
    targets: npt.NDArray[np.int64] | None = ...,
    ignore_index: int = ...,
    bf16: bool = ...,
    topk: bool = ...,
    threads: int = ...,
) -> tuple[
    npt.NDArray[np.float64] | None,
    npt.NDArray[np.float64] | None,
    npt.NDArray[np.float64] | None,
    npt.NDArray[np.float64] | None,
    npt.NDArray[np.bool_] | None,
    npt.NDArray[np.int64] | None,
    npt.NDArray[np.int64] | None,
]: ...
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
def _path_counts() -> tuple[int, int, int]: ...  # (fast, exact, superaccumulator) passes
