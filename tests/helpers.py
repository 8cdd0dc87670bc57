"""Shared test helpers: random heads and labels, and comparison against the fp64 oracle."""

from __future__ import annotations

import torch

from fastpref.ops.reference import reference_token_stats

DIFFERENTIABLE = ("logp", "entropy", "kl")


def make_head(n_rows, seq, d, vocab, *, dtype=torch.float32, bias=False, ref=False, seed=0, scale=1.0):
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
    return out


def make_labels(n_rows, seq, vocab, *, prompt=0, pad=None, seed=0):
    """Random labels with ``prompt`` ignored leading positions and per-row right padding ``pad``."""
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, vocab, (n_rows, seq), generator=g)
    labels[:, :prompt] = -100
    for row, p in enumerate(pad or []):
        if p:
            labels[row, seq - p :] = -100
    return labels


def leaves(tensors: dict, names, dtype=None):
    """Fresh leaf copies (requires_grad) of the named tensors, optionally cast."""
    return {k: v.detach().to(dtype or v.dtype).requires_grad_(True) for k, v in tensors.items() if k in names}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(|b|, tiny): a norm-wise relative error."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def oracle(head: dict, labels: torch.Tensor, **options):
    """The fp64 materialising oracle on the same (exactly upcast) inputs, with fp64 leaves for grads."""
    h64 = {
        k: v.detach().double().requires_grad_(k in ("hidden", "weight", "bias"))
        for k, v in head.items()
        if v is not None
    }
    stats = reference_token_stats(labels=labels, compute_dtype=torch.float64, **{**h64, **options})
    return stats, h64


def weighted_sum(stats, grads: dict) -> torch.Tensor:
    """sum_t g_t * stat_t over the differentiable statistics present, in fp64."""
    total = 0
    for k, g in grads.items():
        x = getattr(stats, k)
        if x is not None:
            total = total + (x.double() * g).sum()
    return total
