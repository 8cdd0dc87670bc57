"""GPU benchmark: fused token statistics (log-probs, fwd+bwd) vs the cuBLAS floor, the naive path and Liger.

Shape of a Llama-3-8B step: M = 8192 valid tokens, d = 4096, V = 128,256, bf16. Every case computes
``sum_t log p(y_t)`` (Liger: its fused linear cross-entropy, the same gradient up to sign) and the
gradients w.r.t. hidden and weight. Per case:

* ms per fwd+bwd: median of CUDA-event-timed repetitions, and that time divided by the cuBLAS floor,
  the three full-size GEMMs every exact method pays at least once (z = h W^T, dz W, dz^T h);
* extra memory: peak allocated during fwd+bwd, minus what was allocated before (the inputs), minus the
  returned gradients (grad_hidden, grad_W): logits, chunks, fp32 accumulators and temporaries.

Targets for fastpref on an H100: <= 1.25x the floor and <= 1 GiB extra memory.

    pytest benchmarks/test_bench_gpu.py     # pytest-benchmark records; ratios and memory in extra_info
    python benchmarks/test_bench_gpu.py     # the same cases, printed as a table
"""

from __future__ import annotations

import statistics
import sys
from typing import Callable

import pytest
import torch

import fastpref
from fastpref.ops.reference import reference_token_stats

M, D, V = 8192, 4096, 128_256
DTYPE = torch.bfloat16
REPS = 5
GIB = 2**30
KEEP_ALL = M * V * torch.finfo(DTYPE).bits // 8  # bytes of every chunk's logits: the backward never recomputes

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def _fastpref(logits_budget: int, chunk_size: int | None = None) -> Step:
    def step(h, w, y):
        stats = fastpref.token_stats(h, w, y, logits_budget=logits_budget, chunk_size=chunk_size)
        stats.logp.sum().backward()

    return step


def _naive() -> Step:
    def step(h, w, y):  # full [M, V] logits, upcast to fp32, plain autograd (eager TRL-style code)
        reference_token_stats(h, w, y).logp.sum().backward()

    return step


def _liger() -> Step:
    liger = pytest.importorskip("liger_kernel.transformers")
    # fp32 grad_W accumulation, as fastpref does (Liger's default accumulates in the weight dtype).
    loss = liger.LigerFusedLinearCrossEntropyLoss(reduction="sum", accum_dtype=torch.float32)

    def step(h, w, y):
        loss(w, h, y).backward()

    return step


CASES: dict[str, Callable[[], Step]] = {
    "fastpref recompute (budget 0)": lambda: _fastpref(0),
    "fastpref keep (budget all)": lambda: _fastpref(KEEP_ALL),
    "fastpref recompute, chunk 2048": lambda: _fastpref(0, chunk_size=2048),
    "fastpref keep, chunk 2048": lambda: _fastpref(KEEP_ALL, chunk_size=2048),
    "naive (materialised fp32 logits)": _naive,
    "Liger fused linear CE": _liger,
}


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(M, D, device="cuda", generator=g).to(DTYPE).requires_grad_()
    w = (torch.randn(V, D, device="cuda", generator=g) * 0.02).to(DTYPE).requires_grad_()  # O(1) logits
    y = torch.randint(0, V, (M,), device="cuda", generator=g)
    return h, w, y


def _median_ms(fn: Callable[[], None], reps: int = REPS, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def floor_ms(h: torch.Tensor, w: torch.Tensor) -> float:
    """The three GEMMs at full size in bf16 (preallocated outputs, a random dz)."""
    h, w = h.detach(), w.detach()
    z = torch.empty(M, V, device="cuda", dtype=DTYPE)
    dz = torch.randn(M, V, device="cuda", dtype=DTYPE)
    grad_h, grad_w = torch.empty_like(h), torch.empty_like(w)

    def gemms():
        torch.mm(h, w.t(), out=z)
        torch.mm(dz, w, out=grad_h)
        torch.mm(dz.t(), h, out=grad_w)

    ms = _median_ms(gemms)
    del z, dz, grad_h, grad_w
    torch.cuda.empty_cache()
    return ms


def _fresh(step: Step, h, w, y) -> Callable[[], None]:
    """One fwd+bwd that allocates its gradients itself, as a training step does."""

    def run():
        h.grad = w.grad = None
        step(h, w, y)

    return run


def extra_memory(step: Step, h, w, y) -> tuple[int, int]:
    """(bytes beyond the inputs and the returned gradients, peak bytes allocated) for one fwd+bwd."""
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(h, w, y)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    extra = peak - before - h.grad.nbytes - w.grad.nbytes
    h.grad = w.grad = None
    torch.cuda.empty_cache()
    return extra, peak


def measure(name: str, h, w, y, floor: float) -> dict[str, float]:
    step = CASES[name]()
    ms = _median_ms(_fresh(step, h, w, y))
    extra, peak = extra_memory(step, h, w, y)
    return {"ms": ms, "x_floor": ms / floor, "extra_GiB": extra / GIB, "peak_GiB": peak / GIB, "floor_ms": floor}


# -------------------------------------------------------------------------------------------------- pytest

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="GPU benchmark: needs a CUDA device (targets are for an H100)"
)


@pytest.fixture(scope="module")
def inputs():
    return _inputs()


@pytest.fixture(scope="module")
def floor(inputs):
    h, w, _ = inputs
    return floor_ms(h, w)


@pytest.mark.parametrize("name", list(CASES))
def test_token_stats_fwd_bwd(benchmark, inputs, floor, name):
    h, w, y = inputs
    benchmark.extra_info.update(measure(name, h, w, y, floor), device=torch.cuda.get_device_name())
    run = _fresh(CASES[name](), h, w, y)
    benchmark.pedantic(lambda: (run(), torch.cuda.synchronize()), rounds=REPS, warmup_rounds=1)


# -------------------------------------------------------------------------------------------------- script


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: M={M}, d={D}, V={V}, {DTYPE}, fwd+bwd")
    h, w, y = _inputs()
    floor = floor_ms(h, w)
    print(f"{'case':<36}{'ms':>9}{'x floor':>9}{'extra GiB':>11}{'peak GiB':>10}")
    print(f"{'cuBLAS floor (3 GEMMs)':<36}{floor:>9.2f}{1.0:>9.2f}{'':>11}{'':>10}")
    for name in CASES:
        try:
            r = measure(name, h, w, y, floor)
        except pytest.skip.Exception as skipped:  # Liger not installed
            print(f"{name:<36}  skipped: {skipped}")
            continue
        print(f"{name:<36}{r['ms']:>9.2f}{r['x_floor']:>9.2f}{r['extra_GiB']:>11.2f}{r['peak_GiB']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
