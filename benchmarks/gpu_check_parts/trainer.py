"""Part trainer: one step of a small Llama-3-8B-shaped model, FastPrefDPOTrainer vs TRL's DPOTrainer."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace
from typing import Callable

from .config import Case, Config, GiB, Skip

TRAINER_VARIANTS = ("fastpref", "trl_fused", "trl_materialised")


def trainer_case(variant: str) -> Callable[[Config], dict]:
    def run(cfg: Config) -> dict:
        for module in ("trl", "datasets", "transformers"):
            if importlib.util.find_spec(module) is None:
                raise Skip(f"{module} is not installed")
        import trl_memory

        result = trl_memory.run_variant(SimpleNamespace(variant=variant, **cfg.trainer))
        return {"step_s": result["seconds"], "peak_GiB": result["peak_rss"] / GiB,
                "step_peak_GiB": result["step_peak"] / GiB, "loss": result["loss"], "tokens": result["tokens"],
                "memory": "peak allocated" if cfg.device == "cuda" else "peak RSS",
                "model": {k: cfg.trainer[k] for k in ("layers", "hidden", "vocab", "intermediate", "dtype")}}

    return run


def trainer_cases(cfg: Config) -> list[Case]:
    return [Case(v, trainer_case(v), 120) for v in TRAINER_VARIANTS]
