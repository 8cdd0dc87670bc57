"""Part tune (``--tune``): chunk rows, and the kernels' BLOCK / num_warps where fastpref exposes them."""

from __future__ import annotations

import importlib
import os
from typing import Callable

from .config import KEEP_ALL, Case, Config, Skip, fastpref
from .head import HEAD_CASES, HeadCase, head_batch, measure_head

KERNEL_ENV = ("FASTPREF_TRITON_BLOCK", "FASTPREF_TRITON_WARPS")


def chunk_tune_case(chunk: int, mode: str) -> Callable[[Config], dict]:
    def run(cfg: Config) -> dict:
        batch = head_batch(cfg)
        budget = KEEP_ALL if mode == "keep" else 0

        def step(b):
            fastpref.preference_loss(b["hidden"], b["weight"], b["labels"], loss="dpo", chunk_size=chunk,
                                     logits_budget=budget, ref_chosen_logps=b["ref_chosen"],
                                     ref_rejected_logps=b["ref_rejected"]).loss.backward()

        return {**measure_head(HeadCase(step, ""), batch, cfg.device, cfg.reps, cfg.warmup),
                "chunk_size": chunk, "mode": mode}

    return run


def _launch_config() -> Callable[[int], tuple[int, int]] | None:
    """``fastpref.ops.triton.launch_config(vocab) -> (BLOCK, num_warps)``, where fastpref exposes it."""
    try:
        return getattr(importlib.import_module("fastpref.ops.triton"), "launch_config", None)
    except Exception:  # noqa: BLE001 - no fastpref / triton here: the case says so
        return None


def kernel_tune_case(block: int, warps: int, mode: str) -> Callable[[Config], dict]:
    """BLOCK / num_warps of the row kernels through FASTPREF_TRITON_BLOCK / _WARPS: the case runs only when
    ``launch_config(vocab)`` reports the requested pair (read at launch, not at import)."""

    def run(cfg: Config) -> dict:
        saved = {k: os.environ.get(k) for k in KERNEL_ENV}
        os.environ.update(dict(zip(KERNEL_ENV, (str(block), str(warps)))))
        try:
            used = tuple(_launch_config()(cfg.head["vocab"]))
            if used != (block, warps):
                raise Skip(f"requested (BLOCK, num_warps) = {(block, warps)}, the kernels use {used}")
            name = "fastpref_keep" if mode == "keep" else "fastpref"
            batch = head_batch(cfg)
            result = measure_head(HEAD_CASES[name], batch, cfg.device, cfg.reps, cfg.warmup)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return {**result, "block": block, "num_warps": warps, "mode": mode}

    return run


def _no_kernel_knobs(cfg: Config) -> dict:
    raise Skip("fastpref.ops.triton exposes no launch_config(vocab) reading " + " / ".join(KERNEL_ENV))


def tune_cases(cfg: Config) -> list[Case]:
    cases = [Case(f"chunk {c} {mode}", chunk_tune_case(c, mode))
             for c in cfg.tune_chunks for mode in ("recompute", "keep")]
    if _launch_config() is None:
        return cases + [Case("BLOCK / num_warps", _no_kernel_knobs)]
    return cases + [Case(f"BLOCK {b} warps {w} {mode}", kernel_tune_case(b, w, mode))
                    for b, w in cfg.tune_kernels for mode in ("recompute", "keep")]
