"""Benchmarks: TDPO2 and a K = 4 list loss (MPPO Pair-MNM), fused vs the naive materialising path.

* time: forward + backward at a CI-size shape (d = 256, V = 32000, ~400 completion tokens);
* memory: peak extra RSS (``VmHWM`` reset before each run, Linux) of forward + backward, in a fresh
  subprocess, at two V·N sizes (4x apart): the naive path grows with V·N, fastpref's stays at its
  chunk buffers (here 8 MiB of fp32 logits per chunk) and the V x d weight gradient.

"naive" = :func:`fastpref.ops.reference.reference_token_stats` (full fp32 logits, plain autograd,
what eager TRL-style code does) followed by the same loss. Run::

    PYTHONPATH=. pytest benchmarks/test_bench_listwise.py --benchmark-columns=mean,stddev,rounds
    python benchmarks/test_bench_listwise.py            # memory table only
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import fastpref
from fastpref.benchmark import peak_bytes, start_peak
from fastpref.ops.reference import reference_token_stats

DIM, VOCAB, SEQ, PROMPT = 256, 32000, 64, 16
PAIRS, GROUPS, K = 4, 2, 4  # TDPO: 4 pairs = 8 rows; list loss: 2 prompts x 4 responses = 8 rows
MEMORY_SIZES = [(256, 16000), (1024, 16000)]  # (completion tokens N, vocabulary V): V*N x4, same V
MEMORY_CHUNK_BYTES = 8 * 2**20  # fastpref's chunk of fp32 logits in the memory runs


def _inputs(rows: int, seq: int = SEQ, vocab: int = VOCAB, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(rows, seq, DIM, generator=g) / DIM**0.25).requires_grad_()
    weight = (torch.randn(vocab, DIM, generator=g) / DIM**0.25).requires_grad_()
    labels = torch.randint(0, vocab, (rows, seq), generator=g)
    labels[:, :PROMPT] = -100
    ref_hidden = hidden.detach() + 0.1 * torch.randn(rows, seq, DIM, generator=g)
    return hidden, weight, labels, ref_hidden


def _fused_tdpo2(hidden, weight, labels, ref_hidden, **kwargs):
    return fastpref.preference_loss(hidden, weight, labels, loss="tdpo2", ref_hidden=ref_hidden, **kwargs).loss


def _naive_tdpo2(hidden, weight, labels, ref_hidden):
    stats = reference_token_stats(hidden, weight, labels, ref_hidden=ref_hidden, kl=True)
    s, r, d = stats.logp.sum(-1), stats.ref_logp.sum(-1), stats.kl.sum(-1)
    n = s.shape[0] // 2
    return fastpref.tdpo_loss(s[:n], s[n:], r[:n], r[n:], d[:n], d[n:])[0]


def _fused_list(hidden, weight, labels, scores, **kwargs):
    return fastpref.preference_loss(hidden, weight, labels, loss="mppo_pair_mnm", group_sizes=[K] * GROUPS,
                                    scores=scores, **kwargs).loss


def _naive_list(hidden, weight, labels, scores):
    stats = reference_token_stats(hidden, weight, labels)
    mean = stats.logp.sum(-1) / (labels != -100).sum(-1)
    return fastpref.mppo_pair_mnm_loss(mean.view(GROUPS, K), scores.view(GROUPS, K))[0]


def _step(loss_fn, leaves, *args):
    for x in leaves:
        x.grad = None
    loss = loss_fn(*args)
    loss.backward()
    return loss.detach()


@pytest.fixture(scope="module")
def tdpo_inputs():
    return _inputs(2 * PAIRS)


@pytest.fixture(scope="module")
def list_inputs():
    hidden, weight, labels, _ = _inputs(GROUPS * K, seed=1)
    return hidden, weight, labels, torch.tensor([0.9, 0.2, 0.5, 0.7, 0.3, 0.8, 0.1, 0.6])


IMPLS = ["fastpref", "fastpref_keep", "naive"]  # keep: chunk logits kept for the backward (3 GEMMs, not 4)


def _impl(impl: str, fused, naive):
    if impl == "naive":
        return naive
    budget = (1 << 62) if impl == "fastpref_keep" else 0
    return lambda *args: fused(*args, logits_budget=budget)


@pytest.mark.parametrize("impl", IMPLS)
def test_tdpo2_fwd_bwd(benchmark, tdpo_inputs, impl):
    hidden, weight, labels, ref_hidden = tdpo_inputs
    fn = _impl(impl, _fused_tdpo2, _naive_tdpo2)
    benchmark.group = f"tdpo2 fwd+bwd d={DIM} V={VOCAB} tokens={int((labels != -100).sum())}"
    loss = benchmark(_step, fn, (hidden, weight), hidden, weight, labels, ref_hidden)
    expected = _naive_tdpo2(hidden, weight, labels, ref_hidden)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_list_k4_fwd_bwd(benchmark, list_inputs, impl):
    hidden, weight, labels, scores = list_inputs
    fn = _impl(impl, _fused_list, _naive_list)
    benchmark.group = f"mppo_pair_mnm K={K} fwd+bwd d={DIM} V={VOCAB} tokens={int((labels != -100).sum())}"
    loss = benchmark(_step, fn, (hidden, weight), hidden, weight, labels, scores)
    torch.testing.assert_close(loss, _naive_list(hidden, weight, labels, scores).detach(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- peak memory (a fresh process, Linux)


def _measure(impl: str, loss: str, tokens: int, vocab: int) -> dict:
    """Peak RSS above the current footprint during one forward + backward (the peak is reset first)."""
    import gc

    rows = 8
    seq = tokens // rows + PROMPT
    hidden, weight, labels, ref_hidden = _inputs(rows, seq=seq, vocab=vocab)
    scores = torch.arange(rows, dtype=torch.float32)
    chunk = max(16, MEMORY_CHUNK_BYTES // (4 * vocab))
    if loss == "tdpo2":
        args = (hidden, weight, labels, ref_hidden)
        fn = _naive_tdpo2 if impl == "naive" else lambda *a: _fused_tdpo2(*a, chunk_size=chunk)
    else:
        args = (hidden, weight, labels, scores)
        fn = _naive_list if impl == "naive" else lambda *a: _fused_list(*a, chunk_size=chunk)
    gc.collect()
    base = start_peak("cpu")  # resets the peak RSS (VmHWM) to the current RSS
    _step(fn, (hidden, weight), *args)
    return {"impl": impl, "loss": loss, "tokens": int((labels != -100).sum()), "vocab": vocab,
            "extra_mib": round(max(0, peak_bytes("cpu") - base) / 2**20, 1)}


def _measure_all(runs: list[tuple[str, str, int, int]]) -> list[dict]:
    for impl, loss, _, _ in runs:  # first-call costs (thread pools, autograd) out of the measurements
        _measure(impl, loss, 64, 1000)
    return [_measure(*run) for run in runs]


def _measure_in_subprocess(runs: list[tuple[str, str, int, int]]) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
           # a fixed mmap threshold: glibc's dynamic one would serve freed-and-reallocated logits chunks from
           # the heap and keep them resident, so RSS would count allocator caching, not live tensors
           "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import test_bench_listwise as b; print(json.dumps(b._measure_all({runs!r})))")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"memory runs failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_table(losses=("tdpo2", "mppo_pair_mnm")) -> list[dict]:
    return _measure_in_subprocess([(impl, loss, n, v) for loss in losses for n, v in MEMORY_SIZES
                                   for impl in ("fastpref", "naive")])


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_does_not_grow_with_vocab_times_tokens():
    table = memory_table()
    runs = {(r["loss"], r["impl"], r["tokens"]): r["extra_mib"] for r in table}
    (small, _), (big, _) = MEMORY_SIZES
    print("\npeak extra RSS (MiB):", runs)
    for loss in ("tdpo2", "mppo_pair_mnm"):
        # naive holds [N, V] fp32 logits (and softmax, grads): grows with V*N
        assert runs[(loss, "naive", big)] > 2 * runs[(loss, "naive", small)]
        # fastpref holds chunk buffers of a fixed byte size, whatever V*N
        assert runs[(loss, "fastpref", big)] < 1.25 * runs[(loss, "fastpref", small)] + 8
        assert runs[(loss, "fastpref", big)] < 0.5 * runs[(loss, "naive", big)]


if __name__ == "__main__":
    print(f"{'loss':<15}{'impl':<10}{'tokens':>8}{'vocab':>8}{'extra MiB':>11}")
    for row in memory_table():
        print(f"{row['loss']:<15}{row['impl']:<10}{row['tokens']:>8}{row['vocab']:>8}{row['extra_mib']:>11}")
