"""Triton row kernels (the CUDA backend) vs the fp64 oracle and the PyTorch backend.

On a CUDA machine the kernels run compiled; without CUDA, ``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before triton is imported, so they run in Triton's interpreter on CPU tensors
(small shapes: the interpreter is ~300x slower than torch).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

import fastpref  # noqa: E402
from fastpref.ops import dispatch, rows_torch  # noqa: E402
from fastpref.ops import triton as triton_rows  # noqa: E402
from fastpref.ops.dispatch import Want  # noqa: E402
from fastpref.ops.reference import reference_token_stats  # noqa: E402
from helpers import make_head, make_labels, oracle, rel_err, weighted_sum  # noqa: E402

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"

FP32_TOL = 1e-5  # norm-wise relative error (helpers.rel_err), fp32 math on both sides
BF16_STORE_TOL = 2.0**-7  # one bf16 ulp: the interpreter truncates fp32 -> bf16 stores (a GPU rounds, 2**-8)
ALL = Want(entropy=True, log_sum_sq_probs=True, mean_logits=True, is_top1=True, ref_entropy=True, kl=True)
VOCABS = [7, 1000, 4099]  # block of 8 with one masked lane; 1024 with 24 masked; two blocks of 4096, tail of 3


def test_cuda_tensors_resolve_to_triton():
    name, module = dispatch.resolve(torch.device("cuda"))
    assert name == "triton" and module is triton_rows and triton_rows.AVAILABLE


# ---------------------------------------------------------------------------------------------- helpers


def _rows(n, vocab, dtype, *, seed=0, spread=3.0):
    """Policy and reference logits [n, V] (close to each other) and targets, with the awkward rows:
    targets at columns 0 and V-1, one nearly one-hot row (p_y ~ 1) and one row whose max is the last column."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=g) * spread
    zr = z + torch.randn(n, vocab, generator=g)
    y = torch.randint(0, vocab, (n,), generator=g)
    y[0], y[-1] = 0, vocab - 1
    z[1, y[1]] += 25.0
    z[2, -1] = z[2].max() + 2.0
    return z.to(dtype).to(DEVICE), zr.to(dtype).to(DEVICE), y.to(DEVICE)


def _transform64(x, softcap, post_scale):
    x = x.double()
    return post_scale * softcap * torch.tanh(x / softcap) if softcap else x


def _oracle_rows(z, y, zr, *, softcap, post_scale, want=ALL, coef=None):
    """The contract in fp64: reference_token_stats on ``logits @ I`` (exact), lse directly, and
    dL/d(logits) by autograd for ``L = sum g_logp logp + g_entropy H + g_kl KL``."""
    eye = torch.eye(z.shape[1], dtype=torch.float64, device=z.device)
    z64 = z.detach().double().requires_grad_(coef is not None)
    stats = reference_token_stats(
        z64, eye, y, ref_hidden=None if zr is None else zr.double(), entropy=want.entropy,
        log_sum_sq_probs=want.log_sum_sq_probs, mean_logits=want.mean_logits, is_top1=want.is_top1,
        ref_entropy=zr is not None and want.ref_entropy, kl=zr is not None and want.kl,
        softcap=softcap or None, temperature=1.0 / post_scale, compute_dtype=torch.float64,
    )
    out = {k: v for k, v in stats._asdict().items() if v is not None}
    out["lse"] = torch.logsumexp(_transform64(z, softcap, post_scale), dim=-1)
    if zr is not None:
        out["ref_lse"] = torch.logsumexp(_transform64(zr, softcap, post_scale), dim=-1)
    if coef is None:
        return out
    loss = sum((getattr(stats, k) * g.double()).sum() for k, g in coef.items())
    (grad,) = torch.autograd.grad(loss, z64)
    return out, grad


def _assert_stats(got, want, tol=FP32_TOL):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k, v in want.items():
        assert got[k].shape == v.shape, k
        if k == "is_top1":
            assert got[k].dtype == torch.bool and torch.equal(got[k].cpu(), v.cpu()), k
        else:
            assert got[k].dtype == torch.float32, k
            assert rel_err(got[k], v) < tol, (k, rel_err(got[k], v))


def _softcap_args(softcap):
    return dict(softcap=softcap, post_scale=1 / 0.7 if softcap else 1.0)  # post_scale = 1 / temperature


# ----------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("softcap", [0.0, 5.0], ids=["plain", "softcap"])
def test_forward_matches_oracle_and_torch_backend(vocab, dtype, softcap):
    z, zr, y = _rows(6, vocab, dtype)
    args = _softcap_args(softcap)
    got = triton_rows.forward_rows(z, y, want=ALL, ref_logits=zr, **args)
    # The logits are exact in every dtype, so bf16 inputs get fp32-accurate statistics too.
    _assert_stats(got, _oracle_rows(z, y, zr, **args))
    _assert_stats(got, rows_torch.forward_rows(z, y, want=ALL, ref_logits=zr, **args))


WANTS = [Want()] + [Want(**{f.name: True}) for f in dataclasses.fields(Want)]


@pytest.mark.parametrize("want", WANTS, ids=lambda w: "+".join(k for k, v in dataclasses.asdict(w).items() if v) or "none")
@pytest.mark.parametrize("with_ref", [True, False], ids=["ref", "noref"])
def test_forward_computes_exactly_what_is_asked(want, with_ref):
    z, zr, y = _rows(4, 257, torch.float32, seed=1)
    zr = zr if with_ref else None
    got = triton_rows.forward_rows(z, y, want=want, ref_logits=zr)
    _assert_stats(got, rows_torch.forward_rows(z, y, want=want, ref_logits=zr))


def test_is_top1_first_maximum_wins():
    vocab = 4099  # ties inside one block and across the two blocks
    z = torch.randn(6, vocab).to(DEVICE)
    top = z.max() + 1.0
    y = torch.tensor([10, 10, 4097, 4097, 3, 4098], device=DEVICE)
    z[0, [10, 20]] = top  # target first: top-1
    z[1, [5, 10]] = top  # earlier tie in the same block: not top-1
    z[2, [4097, 4098]] = top  # target first, both in the second block
    z[3, [100, 4097]] = top  # earlier tie in the first block
    z[4, 3] = top  # unique maximum
    z[5, 0] = top  # target is not the maximum
    got = triton_rows.forward_rows(z, y, want=Want(is_top1=True))["is_top1"]
    assert got.tolist() == (z.argmax(dim=-1) == y).tolist() == [True, False, True, False, True, False]


def test_forward_large_logits():
    # |z| up to ~120: the running max moves by large steps and lse is far from the entropy's scale.
    z, zr, y = _rows(6, 4099, torch.float32, seed=2, spread=30.0)
    got = triton_rows.forward_rows(z, y, want=ALL, ref_logits=zr)
    want = _oracle_rows(z, y, zr, softcap=0.0, post_scale=1.0)
    for k in ("lse", "logp", "ref_lse", "ref_logp"):
        assert rel_err(got[k], want[k]) < FP32_TOL, k
    for k in ("entropy", "ref_entropy", "kl"):  # O(1) values next to O(100) logits: absolute error
        assert (got[k] - want[k]).abs().max().item() < 2e-4, k


# ---------------------------------------------------------------------------------------------- backward


def _coefficients(n, names, seed=5):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, generator=g).to(DEVICE) for k in names}


def _backward(rows_module, z, y, zr, coef, *, softcap, post_scale):
    """dz from one backend's backward_rows_, fed by its own forward statistics."""
    stats = rows_module.forward_rows(z, y, want=ALL, ref_logits=zr, softcap=softcap, post_scale=post_scale)
    dz = z.clone()
    rows_module.backward_rows_(
        dz, y, stats["lse"], g_logp=coef.get("logp"), g_entropy=coef.get("entropy"),
        entropy=stats["entropy"] if "entropy" in coef else None, g_kl=coef.get("kl"),
        ref_logits=zr.clone() if "kl" in coef else None, ref_lse=stats["ref_lse"] if "kl" in coef else None,
        softcap=softcap, post_scale=post_scale,
    )
    return dz


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("softcap", [0.0, 5.0], ids=["plain", "softcap"])
def test_backward_matches_oracle_and_torch_backend(vocab, dtype, softcap):
    z, zr, y = _rows(6, vocab, dtype)
    args = _softcap_args(softcap)
    coef = _coefficients(6, ("logp", "entropy", "kl"))
    dz = _backward(triton_rows, z, y, zr, coef, **args)
    assert dz.dtype == dtype
    _, want = _oracle_rows(z, y, zr, coef=coef, **args)
    tol = FP32_TOL if dtype == torch.float32 else BF16_STORE_TOL
    assert rel_err(dz, want) < tol
    assert rel_err(dz, _backward(rows_torch, z, y, zr, coef, **args)) < tol


@pytest.mark.parametrize("names", [("logp",), ("entropy",), ("kl",), ("logp", "entropy")], ids="+".join)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_backward_each_coefficient(names, dtype):
    z, zr, y = _rows(5, 1000, dtype, seed=3)
    coef = _coefficients(5, names)
    dz = _backward(triton_rows, z, y, zr, coef, softcap=0.0, post_scale=1.0)
    _, want = _oracle_rows(z, y, zr, coef=coef, softcap=0.0, post_scale=1.0)
    # fp16 keeps 10 mantissa bits: truncation costs at most 2**-10 of the largest gradient.
    assert rel_err(dz, want) < (FP32_TOL if dtype == torch.float32 else 2.0**-10)


def test_backward_target_term_in_fp32():
    # p_y = 1 - 2.5e-4 rounds to 1.0 in bf16: 1 - p_y must come out of fp32 math, not from a rounded p_y.
    z = torch.zeros(2, 300)
    z[:, 7] = 14.0
    z = z.to(torch.bfloat16).to(DEVICE)
    y = torch.tensor([7, 8], device=DEVICE)
    lse = triton_rows.forward_rows(z, y, want=Want())["lse"]
    dz = z.clone()
    triton_rows.backward_rows_(dz, y, lse, g_logp=torch.ones(2, device=DEVICE))
    p_other = 1.0 / (torch.tensor(14.0, dtype=torch.float64).exp().item() + 299)
    assert dz[0, 7].item() == pytest.approx(299 * p_other, rel=2**-7)  # 1 - p_y
    assert dz[0, 8].item() == pytest.approx(-p_other, rel=2**-7)
    assert dz[1, 7].item() == pytest.approx(-(1 - 299 * p_other), rel=2**-7)
    assert dz[1, 8].item() == pytest.approx(1 - p_other, rel=2**-7)


# ------------------------------------------------------------------------------------------------ layout


def test_int64_row_offsets():
    # Row 2 starts 2**31 + 128 elements into the buffer: int32 row * stride would wrap (and crash).
    # The 4 GiB buffer is never touched beyond the three rows (lazily committed on CPU).
    vocab, stride = 300, 2**30 + 64
    buf = torch.empty(2 * stride + vocab, dtype=torch.bfloat16, device=DEVICE)
    z = buf.as_strided((3, vocab), (stride, 1))
    z.copy_(torch.randn(3, vocab))
    y = torch.tensor([0, 150, 299], device=DEVICE)
    want = rows_torch.forward_rows(z.clone(), y, want=Want(entropy=True))
    _assert_stats(triton_rows.forward_rows(z, y, want=Want(entropy=True)), want)
    dz = z.clone()
    rows_torch.backward_rows_(dz, y, want["lse"], g_logp=torch.ones(3, device=DEVICE))
    triton_rows.backward_rows_(z, y, want["lse"], g_logp=torch.ones(3, device=DEVICE))
    assert rel_err(z, dz) < BF16_STORE_TOL


def test_non_contiguous_logits():
    z, zr, y = _rows(5, 513, torch.float32, seed=4)
    zt = z.t().contiguous().t()  # column stride 5: the wrappers go through a contiguous copy
    assert zt.stride(-1) != 1
    _assert_stats(triton_rows.forward_rows(zt, y, want=ALL, ref_logits=zr.t().contiguous().t()),
                  rows_torch.forward_rows(z, y, want=ALL, ref_logits=zr))
    coef = _coefficients(5, ("logp", "entropy"))
    stats = rows_torch.forward_rows(z, y, want=Want(entropy=True))
    rows_torch.backward_rows_(z, y, stats["lse"], g_logp=coef["logp"], g_entropy=coef["entropy"], entropy=stats["entropy"])
    triton_rows.backward_rows_(zt, y, stats["lse"], g_logp=coef["logp"], g_entropy=coef["entropy"], entropy=stats["entropy"])
    assert rel_err(zt, z) < FP32_TOL


def test_empty_chunk():
    z = torch.empty(0, 11, device=DEVICE)
    y = torch.empty(0, dtype=torch.long, device=DEVICE)
    out = triton_rows.forward_rows(z, y, want=ALL, ref_logits=z)
    assert set(out) == set(rows_torch.forward_rows(z, y, want=ALL, ref_logits=z))
    assert all(v.shape == (0,) for v in out.values())
    triton_rows.backward_rows_(z, y, out["lse"], g_logp=out["lse"])


# ------------------------------------------------------------------------------------- the whole op, fwd+bwd


def _token_stats(head, labels, up, backend, **options):
    """Stats and the gradients w.r.t. every leaf of ``head`` that requires grad."""
    leaves = {k: v.detach().clone().requires_grad_(k in ("hidden", "weight", "bias")) for k, v in head.items()}
    stats = fastpref.token_stats(labels=labels, backend=backend, **leaves, **options)
    names = [k for k, v in leaves.items() if v.requires_grad]
    grads = torch.autograd.grad(weighted_sum(stats, up), [leaves[k] for k in names])
    return stats, dict(zip(names, grads))


FULL = dict(entropy=True, kl=True, ref_entropy=True, log_sum_sq_probs=True, mean_logits=True, is_top1=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("budget", [0, 1 << 30], ids=["recompute", "keep"])
@pytest.mark.parametrize("transform", [{}, dict(softcap=4.0, temperature=0.7, logit_scale=1.3)], ids=["plain", "softcap"])
def test_token_stats_matches_torch_backend(dtype, budget, transform):
    head = {k: v.to(DEVICE) for k, v in make_head(2, 9, 24, 1031, dtype=dtype, bias=True, ref=True).items()}
    labels = make_labels(2, 9, 1031, prompt=3, pad=[2, 0]).to(DEVICE)  # ignored positions
    g = torch.Generator().manual_seed(7)
    up = {k: torch.randn(labels.shape, generator=g, dtype=torch.float64).to(DEVICE) for k in ("logp", "entropy", "kl")}
    opts = dict(FULL, logits_budget=budget, chunk_size=5, **transform)  # three chunks of valid rows
    stats, grads = _token_stats(head, labels, up, "triton", **opts)
    ref_stats, ref_grads = _token_stats(head, labels, up, "torch", **opts)
    for name in stats._fields:  # same bf16 logits on both paths, fp32 statistics
        got, want = getattr(stats, name), getattr(ref_stats, name)
        if name == "is_top1":
            assert torch.equal(got, want)
        else:
            assert rel_err(got, want) < FP32_TOL, name
    # bf16: dz rounds differently (truncating interpreter), then goes through bf16 GEMMs.
    tol = FP32_TOL if dtype == torch.float32 else 2.0**-6
    assert set(grads) == {"hidden", "weight", "bias"}
    for name, grad in grads.items():
        assert grad.dtype == dtype and rel_err(grad, ref_grads[name]) < tol, (name, rel_err(grad, ref_grads[name]))
    if dtype == torch.float32:  # and the fp64 oracle
        want_stats, h64 = oracle({k: v.cpu() for k, v in head.items()}, labels.cpu(), **FULL, **transform)
        targets = {k: v for k, v in h64.items() if v.requires_grad}
        oracle_grads = torch.autograd.grad(weighted_sum(want_stats, {k: v.cpu() for k, v in up.items()}),
                                           list(targets.values()))
        for name, want in zip(targets, oracle_grads):
            assert rel_err(grads[name].cpu(), want) < FP32_TOL, name
        assert rel_err(stats.kl.cpu(), want_stats.kl) < FP32_TOL


def test_token_stats_frozen_head():
    # LoRA-style frozen head: the backward runs in forward() (hidden-space pieces), grad only for hidden.
    head = {k: v.to(DEVICE) for k, v in make_head(2, 6, 16, 301, ref=True).items()}
    head["weight"] = head["weight"].detach()
    labels = make_labels(2, 6, 301, prompt=2).to(DEVICE)
    up = {k: torch.ones(labels.shape, dtype=torch.float64, device=DEVICE) for k in ("logp", "entropy", "kl")}
    h = head["hidden"].clone().requires_grad_(True)
    grads = {}
    for backend in ("triton", "torch"):
        h.grad = None
        stats = fastpref.token_stats(h, head["weight"], labels, ref_hidden=head["ref_hidden"],
                                     ref_weight=head["ref_weight"], entropy=True, kl=True, chunk_size=4, backend=backend)
        weighted_sum(stats, up).backward()
        grads[backend] = h.grad.clone()
    assert rel_err(grads["triton"], grads["torch"]) < FP32_TOL


def test_backend_forced_by_environment(monkeypatch):
    monkeypatch.setenv("FASTPREF_BACKEND", "triton")
    name, module = dispatch.resolve(torch.device(DEVICE))
    assert name == "triton" and module is triton_rows
    assert fastpref.backends()["triton"]
