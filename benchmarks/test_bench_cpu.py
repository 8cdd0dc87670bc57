"""CPU benchmark: fused token statistics (log-probs, fwd+bwd) on the C++ and the PyTorch row kernels,
against the GEMM floor and the naive materialising path.

Every case computes ``sum_t log p(y_t)`` and its gradients w.r.t. hidden and weight, fp32. The GEMM
floor is the three GEMMs over the valid tokens that every exact method pays at least once:
``z = h W^T``, ``dz W`` and ``dz^T h``.

CI-size shape (pytest-benchmark): N = 256 valid tokens, d = 512, V = 32,000.

    pytest benchmarks/test_bench_cpu.py --benchmark-only

Target shape (a Llama-3 head: d = 4096, V = 128,256; M = 1024 valid tokens, 2 threads), one report:

    python benchmarks/test_bench_cpu.py [--tokens 1024 --d 4096 --vocab 128256 --threads 2 --reps 3]

which prints, measured in one run (the best of ``--reps`` rounds for every timing; the floor and the
fwd+bwd steps run interleaved within each round):

* the three GEMMs at full size, each with its GFLOP/s, and their sum, the floor;
* row work, everything but the GEMMs: ``forward_rows`` + ``backward_rows_`` over all M x V logits in
  each backend's chunks (``get_backend(name).chunk_rows(V, 4)`` rows), as % of the floor, for the C++ and
  the PyTorch backends;
* fwd+bwd of ``token_stats`` with the logits kept (``logits_budget`` large: 3 GEMMs) and recomputed
  (``logits_budget=0``: 4 GEMMs, ideal 1.33x the floor), as multiples of the floor;
* peak extra memory of fwd+bwd, in a fresh subprocess on Linux: the resident high-water mark during
  the step minus the resident size before it, for the first step (with one-time setup) and the
  second, against grad_W + grad_hidden + one chunk.

Compare the cases of one run, not absolute times: these machines are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Callable

import pytest
import torch

import fastpref
from fastpref.benchmark import peak_bytes, start_peak
from fastpref.ops import cpu, rows_torch
from fastpref.ops.backend import Want, get_backend
from fastpref.ops.reference import reference_token_stats

CI_SHAPE = dict(tokens=256, d=512, vocab=32_000)
KEEP_ALL = 1 << 62  # logits_budget that keeps every chunk
MIB = 2**20

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def make_inputs(tokens: int, d: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, d, generator=g).requires_grad_()
    w = torch.randn(vocab, d, generator=g).mul_(d**-0.5).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=g)
    return h, w, y


def fastpref_step(backend: str, logits_budget: int) -> Step:
    def step(h, w, y):
        fastpref.token_stats(h, w, y, backend=backend, logits_budget=logits_budget).logp.sum().backward()

    return step


def naive_step(h, w, y):  # the full [M, V] logits in the input dtype, upcast to fp32, plain autograd
    reference_token_stats(h, w, y).logp.sum().backward()


STEPS: dict[str, Step] = {
    "cpp kept": fastpref_step("cpp", KEEP_ALL),
    "cpp recompute": fastpref_step("cpp", 0),
    "torch kept": fastpref_step("torch", KEEP_ALL),
    "torch recompute": fastpref_step("torch", 0),
    "naive": naive_step,
}


def gemm_floor(h: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], None]]:
    """The three full-size GEMMs on preallocated outputs and a random dz, one callable each."""
    h, w = h.detach(), w.detach()
    z = torch.empty(h.shape[0], w.shape[0])
    dz = torch.randn(h.shape[0], w.shape[0])
    grad_h, grad_w = torch.empty_like(h), torch.empty_like(w)
    return {
        "z = h W^T": lambda: torch.mm(h, w.t(), out=z),
        "grad_h = dz W": lambda: torch.mm(dz, w, out=grad_h),
        "grad_W = dz^T h": lambda: torch.mm(dz.t(), h, out=grad_w),
    }


# -------------------------------------------------------------------------------------------------- pytest


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(**CI_SHAPE)


def _group() -> str:
    return f"cpu fwd+bwd, {CI_SHAPE['tokens']} tokens, d={CI_SHAPE['d']}, V={CI_SHAPE['vocab']}, fp32"


@pytest.mark.parametrize("name", list(STEPS))
def test_cpu_fwd_bwd(benchmark, inputs, name):
    if name.startswith("cpp") and not cpu.AVAILABLE:
        pytest.skip(f"C++ kernels not built: {cpu.IMPORT_ERROR}")
    h, w, y = inputs
    benchmark.group = _group()

    def reset():
        h.grad = w.grad = None

    benchmark.pedantic(STEPS[name], args=(h, w, y), setup=reset, rounds=5, warmup_rounds=1)
    assert h.grad is not None and w.grad is not None


def test_cpu_gemm_floor(benchmark, inputs):
    h, w, _ = inputs
    gemms = list(gemm_floor(h, w).values())
    benchmark.group = _group()
    benchmark.pedantic(lambda: [gemm() for gemm in gemms], rounds=5, warmup_rounds=1)


# -------------------------------------------------------------------------------------------------- script


def seconds(fn: Callable[[], object], setup: Callable[[], object] | None = None) -> tuple[float, float]:
    """(wall, CPU) seconds of one call of ``fn``, CPU summed over this process's threads; ``setup`` is untimed.

    On a shared machine the CPU time is the steadier number: it grows little when other processes
    take the cores away, while the wall time grows by however long they hold them.
    """
    if setup is not None:
        setup()
    wall, cpu_time = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu_time


def best_seconds(fn: Callable[[], object], reps: int, setup: Callable[[], object] | None = None) -> float:
    """Minimum wall time of ``reps`` calls (the least disturbed by other load)."""
    return min(seconds(fn, setup)[0] for _ in range(reps))


def row_work_seconds(backend: str, rows_module, z: torch.Tensor, y: torch.Tensor, reps: int) -> tuple[float, float]:
    """(forward, backward) seconds of one backend's row kernels over all logits ``z``, chunk by chunk."""
    rows = get_backend(backend).chunk_rows(z.shape[1], 4)
    spans = [(s, min(s + rows, z.shape[0])) for s in range(0, z.shape[0], rows)]
    lse = torch.empty(z.shape[0])
    work = torch.empty_like(z)
    ones = torch.ones(z.shape[0])

    def forward():
        for s, e in spans:
            lse[s:e] = rows_module.forward_rows(z[s:e], y[s:e], want=Want())["lse"]

    def backward():
        for s, e in spans:
            rows_module.backward_rows_(work[s:e], y[s:e], lse[s:e], g_logp=ones[s:e])

    fwd = best_seconds(forward, reps)
    bwd = best_seconds(backward, reps, setup=lambda: work.copy_(z))
    return fwd, bwd


def rss_child(args) -> None:
    """Runs in a fresh process: the peak extra resident memory of a first and of a second fwd+bwd, as JSON.

    Peak = the kernel's resident high-water mark (VmHWM, what ru_maxrss reports), reset to the
    current size just before each step, minus that size. ru_maxrss itself is not usable: across
    fork + exec it keeps the parent's high-water mark, which holds the same large inputs. The
    parent sets a fixed glibc mmap threshold, so that freed tensors leave the resident set instead
    of staying in the heap. The first step also pays one-time setup (OpenMP threads, MKL buffers).
    """
    torch.set_num_threads(args.threads)
    h, w, y = make_inputs(args.tokens, args.d, args.vocab)
    extra = []
    for _ in range(2):
        h.grad = w.grad = None
        before = start_peak("cpu")  # resets the high-water mark to the current resident size
        STEPS[args.rss_child](h, w, y)
        extra.append(peak_bytes("cpu") - before)
    print(json.dumps({"first": extra[0], "second": extra[1]}))


def peak_extra_bytes(args, name: str) -> tuple[int, int]:
    """(first step, second step) peak extra resident bytes of ``name`` in a fresh process."""
    cmd = [sys.executable, __file__, "--rss-child", name, "--tokens", str(args.tokens), "--d", str(args.d),
           "--vocab", str(args.vocab), "--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}  # blocks >= 1 MiB: mmap, unmapped on free
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    result = json.loads(out.splitlines()[-1])
    return result["first"], result["second"]


def report(args) -> None:
    torch.set_num_threads(args.threads)
    m, d, vocab = args.tokens, args.d, args.vocab
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, fastpref C++ kernels: {cpu.isa() or 'not built'}")
    print(f"M={m} valid tokens, d={d}, V={vocab}, fp32, chunk={get_backend('cpp').chunk_rows(vocab, 4)} rows (C++); "
          f"best of {args.reps} rounds")
    h, w, y = make_inputs(m, d, vocab)

    with torch.no_grad():
        z = h @ w.t()
    row_work = {}
    backends = {"cpp": cpu, "torch": rows_torch} if cpu.AVAILABLE else {"torch": rows_torch}
    for name, module in backends.items():
        row_work[name] = row_work_seconds(name, module, z, y, args.reps)
    del z

    # The floor and the fwd+bwd steps run interleaved, round after round, so that a burst of other
    # load on a shared machine hits all cases alike; each case reports its best round.
    gemms = gemm_floor(h, w)
    steps = [n for n in STEPS if n != "naive" and (cpu.AVAILABLE or not n.startswith("cpp"))]
    gemm_s = {k: [] for k in gemms}
    step_s = {k: [] for k in steps}

    def reset():
        h.grad = w.grad = None

    for _ in range(args.reps):
        for k, gemm in gemms.items():
            gemm_s[k].append(seconds(gemm))
        for k in steps:
            step_s[k].append(seconds(lambda: STEPS[k](h, w, y), setup=reset))
    del gemms
    # per GEMM, its best round; wall and CPU seconds separately
    floor, floor_cpu = (sum(min(t[i] for t in ts) for ts in gemm_s.values()) for i in (0, 1))

    flops = 2.0 * m * vocab * d
    print(f"\n{'GEMM floor':<24}{'wall s':>8}{'GFLOP/s':>9}{'CPU s':>8}")
    for k, ts in gemm_s.items():
        wall = min(t[0] for t in ts)
        print(f"{k:<24}{wall:>8.2f}{flops / wall / 1e9:>9.1f}{min(t[1] for t in ts):>8.2f}")
    print(f"{'sum = floor':<24}{floor:>8.2f}{'':>9}{floor_cpu:>8.2f}")

    print(f"\n{'row work (M x V logits)':<24}{'fwd s':>8}{'bwd s':>8}{'% floor':>9}")
    for k, (fwd, bwd) in row_work.items():
        print(f"{k:<24}{fwd:>8.3f}{bwd:>8.3f}{100 * (fwd + bwd) / floor:>8.2f}%")

    results = {k: ([t[0] for t in ts], min(t[1] for t in ts)) for k, ts in step_s.items()}
    results["floor"] = ([sum(r[0] for r in rnd) for rnd in zip(*gemm_s.values())], floor_cpu)
    print(f"\n{'fwd+bwd of token_stats':<24}{'wall s':>8}{'x floor':>9}{'CPU s':>8}{'x floor':>9}"
          "   (wall s, every round)")
    for k, (walls, cpu_s) in results.items():
        wall = floor if k == "floor" else min(walls)
        print(f"{k:<24}{wall:>8.2f}{wall / floor:>9.3f}{cpu_s:>8.2f}{cpu_s / floor_cpu:>9.3f}   "
              f"({', '.join(f'{x:.1f}' for x in walls)})")
    del h, w, y

    chunk = min(m, get_backend("cpp").chunk_rows(vocab, 4)) * vocab * 4
    budget = (vocab * d + m * d) * 4 + chunk
    print(f"\npeak extra resident memory of fwd+bwd (fresh process); budget for recompute = grad_W + grad_hidden"
          f" + one chunk = {budget / MIB:.0f} MiB; kept mode also holds all logits ({m * vocab * 4 / MIB:.0f} MiB)")
    print(f"{'':<24}{'1st step MiB':>13}{'x budget':>9}{'2nd step MiB':>14}{'x budget':>9}")
    for k in steps:
        first, second = peak_extra_bytes(args, k)
        print(f"{k:<24}{first / MIB:>13.0f}{first / budget:>9.2f}{second / MIB:>14.0f}{second / budget:>9.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rss-child", choices=list(STEPS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(args)
    else:
        report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
