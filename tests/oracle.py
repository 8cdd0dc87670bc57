"""The tests' one oracle: fp64 materialising references at the row, token and sequence level, and the
random inputs they are compared on.

* rows (a backend's contract): :func:`row_oracle` — every statistic of a chunk of logits and dL/dlogits,
  in fp64, from :func:`fastpref.ops.reference.reference_token_stats` applied to ``logits @ I`` (exact);
* tokens (:func:`fastpref.token_stats`): :func:`token_oracle` on the same (exactly upcast) inputs, with
  fp64 leaves for gradients;
* sequences (level 2/3): :func:`sequence_oracle` — per-row fp64 sums of the token oracle.
"""

from __future__ import annotations

import math
import os

import torch

from fastpref.ops.backend import Want
from fastpref.ops.reference import reference_token_stats

DEVICE = os.environ.get("FASTPREF_TEST_DEVICE", "cpu")  # the GPU check runs the contract tests on "cuda"
ALL_WANT = Want(entropy=True, log_sum_sq_probs=True, mean_logits=True, is_top1=True, ref_entropy=True, kl=True)
DIFFERENTIABLE = ("logp", "entropy", "kl")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(|b|, tiny): a norm-wise relative error."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def assert_close(actual: torch.Tensor, expected, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(), rtol=rtol, atol=atol)


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def softplus(x: float) -> float:
    return -logsigmoid(-x)


# ---- rows ----


def chunk(rows: int, vocab: int, dtype, *, seed: int = 0, spread: float = 3.0, device: str = DEVICE):
    """Policy and reference logits ``[rows, V]`` (close to each other) and targets, with the awkward rows:
    targets at columns 0 and V-1, one nearly one-hot row (p_y ~ 1), one row whose max is the last column."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=g) * spread
    zr = z + torch.randn(rows, vocab, generator=g)
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[0], y[-1] = 0, vocab - 1
    if rows > 2:
        z[1, y[1]] += 25.0
        z[2, -1] = z[2].max() + 2.0
    return z.to(dtype).to(device), zr.to(dtype).to(device), y.to(device)


def _softcapped64(x, softcap, post_scale):
    x = x.double()
    return post_scale * softcap * torch.tanh(x / softcap) if softcap else x


def row_oracle(z, y, zr=None, *, softcap=0.0, post_scale=1.0, want: Want = ALL_WANT, upstream: dict | None = None):
    """The row contract in fp64: ``{stat: [C]}`` (with ``lse``/``ref_lse``), and with ``upstream``
    (``{"g_logp": [C], ...}``) also dL/d(logits) for ``L = sum g_logp logp + g_entropy H + g_kl KL``."""
    eye = torch.eye(z.shape[1], dtype=torch.float64, device=z.device)
    z64 = z.detach().double().requires_grad_(upstream is not None)
    has_ref = zr is not None
    stats = reference_token_stats(
        z64, eye, y, ref_hidden=zr.double() if has_ref else None, entropy=want.entropy,
        log_sum_sq_probs=want.log_sum_sq_probs, mean_logits=want.mean_logits, is_top1=want.is_top1,
        ref_entropy=has_ref and want.ref_entropy, kl=has_ref and want.kl,
        softcap=softcap or None, temperature=1.0 / post_scale, compute_dtype=torch.float64,
    )
    out = {k: v for k, v in stats._asdict().items() if v is not None}
    out["lse"] = torch.logsumexp(_softcapped64(z, softcap, post_scale), dim=-1)
    if has_ref:
        out["ref_lse"] = torch.logsumexp(_softcapped64(zr, softcap, post_scale), dim=-1)
    if upstream is None:
        return out
    loss = sum((getattr(stats, k[2:]) * g.double()).sum() for k, g in upstream.items())
    (grad,) = torch.autograd.grad(loss, z64)
    return out, grad


# ---- tokens ----


def make_head(n_rows, seq, d, vocab, *, dtype=torch.float32, bias=False, ref=False, seed=0, scale=1.0,
              device=DEVICE):
    """hidden [n_rows, seq, d], weight [V, d], optional bias / reference head, with O(1)-O(10) logits."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, seq, d, generator=g) * scale
    weight = torch.randn(vocab, d, generator=g) / d**0.5 * 3
    out = {"hidden": hidden.to(dtype), "weight": weight.to(dtype)}
    if bias:
        out["bias"] = (torch.randn(vocab, generator=g) * 0.5).to(dtype)
    if ref:
        out["ref_hidden"] = (hidden + 0.3 * torch.randn(hidden.shape, generator=g)).to(dtype)
        out["ref_weight"] = (weight + 0.1 * torch.randn(weight.shape, generator=g) / d**0.5).to(dtype)
    return {k: v.to(device) for k, v in out.items()}


def make_labels(n_rows, seq, vocab, *, prompt=0, pad=None, seed=0, device=DEVICE):
    """Random labels with ``prompt`` ignored leading positions and per-row right padding ``pad``."""
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, vocab, (n_rows, seq), generator=g)
    labels[:, :prompt] = -100
    for row, p in enumerate(pad or []):
        if p:
            labels[row, seq - p:] = -100
    return labels.to(device)


def upstream(labels, names=DIFFERENTIABLE, seed=3):
    """Random fp64 upstream gradients shaped like ``labels``, one per statistic name."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(labels.shape, generator=g, dtype=torch.float64).to(labels.device) for k in names}


def weighted_sum(stats, grads: dict) -> torch.Tensor:
    """sum_t g_t * stat_t over the differentiable statistics present, in fp64."""
    total = 0
    for k, g in grads.items():
        x = getattr(stats, k)
        if x is not None:
            total = total + (x.double() * g.to(x.device)).sum()
    return total


def token_oracle(head: dict, labels: torch.Tensor, **options):
    """The fp64 materialising oracle on the same (exactly upcast) inputs, with fp64 leaves for gradients
    (w.r.t. hidden, weight and bias). Returns ``(TokenStats, leaves)``."""
    h64 = {k: v.detach().double().cpu().requires_grad_(k in ("hidden", "weight", "bias"))
           for k, v in head.items() if v is not None}
    stats = reference_token_stats(labels=labels.cpu(), compute_dtype=torch.float64, **{**h64, **options})
    return stats, h64


def run_token_stats(fn, head: dict, labels, grads: dict, **options):
    """``fn`` (token_stats-like) on fresh leaves of ``head``; its statistics and the gradients of
    ``weighted_sum(stats, grads)`` w.r.t. hidden, weight and bias (those that require grad)."""
    leaves = {k: v.detach().clone().requires_grad_(k in ("hidden", "weight", "bias") and v.dtype.is_floating_point)
              for k, v in head.items()}
    stats = fn(labels=labels, **leaves, **options)
    names = [k for k, v in leaves.items() if v.requires_grad]
    loss = weighted_sum(stats, grads)
    gs = torch.autograd.grad(loss, [leaves[k] for k in names]) if loss.requires_grad else [None] * len(names)
    return stats, dict(zip(names, gs))


def token_oracle_grads(head: dict, labels, grads: dict, **options):
    """:func:`token_oracle` and the gradients of the same weighted sum."""
    stats, h64 = token_oracle(head, labels, **options)
    targets = {k: v for k, v in h64.items() if v.requires_grad}
    gs = torch.autograd.grad(weighted_sum(stats, {k: g.cpu() for k, g in grads.items()}), list(targets.values()))
    return stats, dict(zip(targets, gs))


# ---- sequences ----

VOCAB, DIM, SEQ = 40, 16, 7


def make_batch(rows: int, *, seed: int = 0, seq_len: int = SEQ, dim: int = DIM, vocab: int = VOCAB):
    """fp32 leaves ``hidden [rows, T, d]``, ``weight [V, d]``, labels (2 prompt tokens, ragged tails), ref hidden."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(rows, seq_len, dim, generator=g) * 0.7).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) * 0.7).requires_grad_()
    labels = torch.randint(0, vocab, (rows, seq_len), generator=g)
    labels[:, :2] = -100
    ends = torch.randint(3, seq_len + 1, (rows,), generator=g)
    labels[torch.arange(seq_len)[None, :] >= ends[:, None]] = -100
    ref_hidden = hidden.detach() + 0.3 * torch.randn(rows, seq_len, dim, generator=g)
    return hidden, weight, labels, ref_hidden


def leaves(*xs: torch.Tensor) -> list[torch.Tensor]:
    """Fresh copies of leaves for the oracle's own graph."""
    return [x.detach().clone().requires_grad_() for x in xs]


def sequence_oracle(hidden, weight, labels, ref_hidden=None, *, kl=False, log_sum_sq_probs=False, logp_weights=None,
                    kl_weights=None) -> dict[str, torch.Tensor]:
    """Per-row float64 sums of the token oracle's statistics (differentiable w.r.t. hidden, weight)."""
    stats = reference_token_stats(
        hidden, weight, labels, ref_hidden=ref_hidden, kl=kl, log_sum_sq_probs=log_sum_sq_probs,
        compute_dtype=torch.float64,
    )
    n = (labels != -100).sum(-1).double()
    logp = stats.logp.double()
    out = {"sum_logp": logp.sum(-1), "num_tokens": n, "mean_logp": logp.sum(-1) / n}
    if ref_hidden is not None:
        ref_logp = stats.ref_logp.double()
        out["ref_sum_logp"] = ref_logp.sum(-1)
        if logp_weights is not None:
            out["weighted_sum_logp"] = (logp_weights.double() * logp).sum(-1)
            out["ref_weighted_sum_logp"] = (logp_weights.double() * ref_logp).sum(-1)
    if kl:
        out["sum_kl"] = stats.kl.double().sum(-1)
        if kl_weights is not None:
            out["weighted_sum_kl"] = (kl_weights.double() * stats.kl.double()).sum(-1)
    if log_sum_sq_probs:
        out["mean_log_sum_sq_probs"] = stats.log_sum_sq_probs.double().sum(-1) / n
    return out


def pack(hidden: torch.Tensor, labels: torch.Tensor, ref_hidden: torch.Tensor | None = None):
    """Padding-free layout of the same rows: each row cut after its last valid label, concatenated."""
    lengths = [int((row != -100).nonzero().max()) + 1 for row in labels]
    cu = torch.tensor([0] + lengths).cumsum(0)
    h = torch.cat([hidden[i, :n] for i, n in enumerate(lengths)])[None]
    y = torch.cat([labels[i, :n] for i, n in enumerate(lengths)])[None]
    r = None if ref_hidden is None else torch.cat([ref_hidden[i, :n] for i, n in enumerate(lengths)])[None]
    return h, y, r, cu
