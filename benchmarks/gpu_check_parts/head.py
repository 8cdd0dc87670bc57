"""Part bench: one fwd+bwd at the LM head, fastpref against the cuBLAS floors, the naive path and the peers."""

from __future__ import annotations

import importlib.util
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .config import Case, Config, GiB, Skip, fastpref, free_device_memory, head_bench

# Targets at the benchmark shape on an H200 (issue 12): fwd+bwd milliseconds, GiB beyond grad_W + grad_hidden.
TARGETS = {"fastpref": {"ms": 45.0, "beyond_grads_GiB": 1.0}, "fastpref_keep": {"ms": 37.0}}


@dataclass(frozen=True)
class HeadCase:
    """One fwd+bwd at the LM head from a ``fastpref.benchmark.make_batch`` batch (grads land in .grad)."""

    step: Callable[[dict], None]
    what: str
    needs: str | None = None  # a module the case imports
    cuda_only: bool = False
    timeout_s: float = 60.0


def _shared_case(name: str) -> Callable[[dict], None]:
    def step(batch):
        if name not in head_bench.CASES:
            raise RuntimeError(f"fastpref.benchmark has no case {name!r}")
        head_bench.step(name, batch)

    return step


def _four_gemms(batch: dict) -> None:
    """The recompute floor: the 3-GEMM floor plus ``z = h W^T`` once more in the backward."""
    hidden, weight, labels = batch["hidden"], batch["weight"], batch["labels"]
    valid = labels != -100
    with torch.no_grad():
        h = hidden[valid]
        z = h @ weight.T
        torch.mm(h, weight.T, out=z)
        hidden.grad = torch.zeros_like(hidden)
        hidden.grad[valid] = z @ weight
        weight.grad = z.T @ h


def _fastpref_entropy(batch: dict) -> None:
    """Log-probs and entropies, both differentiable (an entropy bonus), recomputing the logits."""
    stats = fastpref.token_stats(batch["hidden"], batch["weight"], batch["labels"], entropy=True)
    (-(stats.logp.sum() + 0.01 * stats.entropy.sum())).backward()


def _flat(batch: dict):
    d = batch["hidden"].shape[-1]
    return batch["hidden"].view(-1, d), batch["weight"], batch["labels"].view(-1)


def _liger_flce(batch: dict) -> None:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    h, w, y = _flat(batch)
    # fp32 grad_W accumulation, as fastpref does (Liger's default accumulates in the weight dtype).
    LigerFusedLinearCrossEntropyLoss(reduction="sum", accum_dtype=torch.float32)(w, h, y).backward()


def _cut_cross_entropy(batch: dict) -> None:
    from cut_cross_entropy import linear_cross_entropy

    h, w, y = _flat(batch)
    linear_cross_entropy(h, w, y, reduction="sum").backward()


def _torch_linear_cross_entropy(batch: dict) -> None:
    if not hasattr(torch.nn.functional, "linear_cross_entropy"):
        raise Skip(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
    h, w, y = _flat(batch)
    options = torch.nn.LinearCrossEntropyOptions() if hasattr(torch.nn, "LinearCrossEntropyOptions") else None
    torch.nn.functional.linear_cross_entropy(h, w, y, reduction="sum", options=options).backward()


HEAD_CASES: dict[str, HeadCase] = {
    "gemm_floor": HeadCase(_shared_case("gemm_floor"), "cuBLAS: z = hWᵀ, dz W, dzᵀ h over the valid tokens"),
    "gemm_floor_4": HeadCase(_four_gemms, "cuBLAS: the same plus z recomputed (the recompute floor)"),
    "fastpref": HeadCase(_shared_case("fastpref"), "preference_loss dpo, logits_budget=0 (recompute)"),
    "fastpref_keep": HeadCase(_shared_case("fastpref_keep"), "preference_loss dpo, every chunk's logits kept"),
    "fastpref_entropy": HeadCase(_fastpref_entropy, "token_stats logp + entropy, both with gradient (recompute)"),
    "naive": HeadCase(_shared_case("naive"), "[N, V] logits, fp32 log-softmax, gather"),
    "trl_fused": HeadCase(_shared_case("trl_fused"), "TRL ChunkedLogProbFunction (chunk 32768)", needs="trl"),
    "liger_flce": HeadCase(_liger_flce, "Liger fused linear cross-entropy, fp32 accumulation", needs="liger_kernel",
                           cuda_only=True),
    "torch_lce": HeadCase(_torch_linear_cross_entropy, "torch.nn.functional.linear_cross_entropy, chunked"),
    "cce": HeadCase(_cut_cross_entropy, "Cut Cross-Entropy (cce, default filter_eps)", needs="cut_cross_entropy",
                    cuda_only=True, timeout_s=150),
    "liger": HeadCase(_shared_case("liger"), "Liger fused linear DPO (torch.compile on CUDA)", needs="liger_kernel",
                      timeout_s=180),
}


_batches: dict = {}


def head_shape(cfg: Config):
    """The benchmark shape as a ``fastpref.benchmark.Shape``."""
    return head_bench.Shape(**cfg.head)


def head_batch(cfg: Config) -> dict:
    """The benchmark's inputs, ``fastpref.benchmark.make_batch`` (one set per worker process)."""
    key = (head_shape(cfg), cfg.device)
    if key not in _batches:
        _batches.clear()
        free_device_memory()
        _batches[key] = head_bench.make_batch(*key)
    return _batches[key]


def _reset(batch: dict) -> None:
    batch["hidden"].grad = batch["weight"].grad = None


def time_ms(fn: Callable[[], None], device: str, reps: int, warmup: int) -> dict:
    """Median (and spread) of ``reps`` timed calls after ``warmup`` untimed ones: CUDA events on CUDA."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "reps": reps}


def step_memory(fn: Callable[[], None], batch: dict, device: str) -> dict:
    """Peak allocated memory of one call above what was allocated before it (the inputs), and beyond the
    gradients it returns (grad_W + grad_hidden). CUDA only (the allocator's counters)."""
    if device != "cuda":
        return {}
    _reset(batch)
    free_device_memory()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    grads = batch["hidden"].grad.nbytes + batch["weight"].grad.nbytes
    _reset(batch)
    return {"peak_extra_GiB": extra / GiB, "beyond_grads_GiB": (extra - grads) / GiB}


def measure_head(case: HeadCase, batch: dict, device: str, reps: int, warmup: int) -> dict:
    def run():
        _reset(batch)
        case.step(batch)

    timing = time_ms(run, device, reps, warmup)
    return {**timing, **step_memory(run, batch, device)}


def _needs(case: HeadCase, device: str) -> None:
    if case.cuda_only and device != "cuda":
        raise Skip("needs CUDA (Triton kernels)")
    if case.needs and importlib.util.find_spec(case.needs) is None:
        raise Skip(f"{case.needs} is not installed")


def bench_case(name: str) -> Callable[[Config], dict]:
    def run(cfg: Config) -> dict:
        case = HEAD_CASES[name]
        _needs(case, cfg.device)
        batch = head_batch(cfg)
        result = measure_head(case, batch, cfg.device, cfg.reps, cfg.warmup)
        return {**result, "what": case.what, **_target_checks(name, result, cfg)}

    return run


def _target_checks(name: str, result: dict, cfg: Config) -> dict:
    target = TARGETS.get(name)
    if not target or cfg.dry:
        return {}
    met = {k: result[k] <= v for k, v in target.items() if k in result}
    return {"target": target, "target_met": all(met.values())}


def bench_cases(cfg: Config) -> list[Case]:
    return [Case(name, bench_case(name), case.timeout_s) for name, case in HEAD_CASES.items()]
