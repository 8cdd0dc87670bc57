"""What every part of the GPU check shares: fastpref's import, the parts, the two modes' shapes, cases."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[2]

try:  # the parent only schedules and reports: it runs (and says why) even when fastpref cannot load here
    import fastpref
    from fastpref import benchmark as head_bench
    from fastpref.ops.reference import reference_token_stats
except Exception as _error:  # noqa: BLE001
    fastpref = head_bench = reference_token_stats = None
    FASTPREF_IMPORT_ERROR = f"{type(_error).__name__}: {_error}"
else:
    FASTPREF_IMPORT_ERROR = None

GiB = 2**30
PARTS = ("env", "correctness", "tests", "bench", "trainer", "tune")
DEFAULT_PARTS = ("env", "correctness", "bench", "tests", "trainer")
# Per-part caps in seconds (a part also stops at the global --budget-s deadline).
PART_BUDGET_S = {"env": 60, "correctness": 90, "bench": 130, "tests": 80, "trainer": 100, "tune": 300}
KEEP_ALL = 1 << 62  # a logits budget that keeps every chunk


@dataclass(frozen=True)
class Config:
    """Shapes and repetitions of one mode: the GPU check, or ``--dry`` (CPU, Triton interpreter, tiny)."""

    dry: bool
    device: str
    head: dict  # the benchmark / tuning shape: fastpref.benchmark.Shape(**head)
    sweep: tuple[int, int, int, int]  # (rows, seq, d, V) of the small cases; V > the kernel block, not a multiple
    chunk: int  # rows per chunk in the small cases: several chunks, the last one short
    large: tuple[int, int, int]  # (tokens, d, V) of the bf16 bounds at full size
    int64: tuple[int, int, int]  # (rows, d, V) of the one-chunk N·V > 2**31 case
    one_row_vocab: int
    reps: int
    warmup: int
    trainer: dict
    tune_chunks: tuple[int, ...]
    tune_kernels: tuple[tuple[int, int], ...]  # (BLOCK, num_warps)


def gpu_config() -> Config:
    vocab = 128_256
    return Config(
        dry=False, device="cuda",
        head=dict(pairs=4, response=1024, prompt=0, d=4096, vocab=vocab, dtype="bfloat16"),
        sweep=(3, 8, 64, 5003), chunk=5,
        large=(8192, 4096, vocab), int64=(2**31 // vocab + 65, 64, vocab), one_row_vocab=vocab,
        reps=10, warmup=2,
        trainer=dict(layers=2, pairs=4, prompt=512, completion=512, dtype="bfloat16", device="cuda",
                     hidden=4096, vocab=vocab, intermediate=14336),
        tune_chunks=(512, 1024, 2048, 4096, 8192),
        tune_kernels=tuple((b, w) for b in (1024, 2048, 4096, 8192) for w in (4, 8, 16)),
    )


def dry_config() -> Config:
    return Config(
        dry=True, device="cpu",
        head=dict(pairs=1, response=32, prompt=16, d=64, vocab=2048, dtype="float32"),
        sweep=(2, 5, 16, 4099), chunk=2, large=(6, 32, 1000), int64=(8, 16, 300), one_row_vocab=4099,
        reps=2, warmup=1,
        trainer=dict(layers=2, pairs=1, prompt=8, completion=8, dtype="float32", device="cpu",
                     hidden=64, vocab=512, intermediate=128),
        tune_chunks=(64, 128), tune_kernels=((1024, 4),),
    )


class Skip(Exception):
    """A case that cannot run here (a peer not installed, CUDA-only code in --dry)."""


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Config], dict]
    timeout_s: float = 60.0


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
