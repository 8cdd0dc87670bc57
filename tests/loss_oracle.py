"""Helpers for the listwise / token-level / unpaired loss tests: small inputs and a float64 oracle.

The oracle is :func:`fastpref.ops.reference.reference_token_stats` (materialised logits, computed in
float64), reduced per row by plain sums here, so the fused front door can be checked against a loss built
independently from the oracle's per-token statistics.
"""

from __future__ import annotations

import math

import torch

from fastpref.ops.reference import reference_token_stats

VOCAB, DIM, SEQ = 40, 16, 7


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def softplus(x: float) -> float:
    return -logsigmoid(-x)


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


def oracle(hidden, weight, labels, ref_hidden=None, *, kl=False, log_sum_sq_probs=False, logp_weights=None,
           kl_weights=None) -> dict[str, torch.Tensor]:
    """Per-row float64 sums of the materialising oracle's per-token stats (differentiable w.r.t. hidden, weight)."""
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


def assert_close(actual: torch.Tensor, expected, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=rtol, atol=atol)
