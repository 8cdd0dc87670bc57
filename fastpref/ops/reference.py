"""The materialising oracle of :func:`fastpref.token_stats`: full ``[N, V]`` logits, plain autograd.

Used by the tests and as the "naive" path of the benchmarks (what eager TRL-style code does). Never
the fast path.
"""

from __future__ import annotations

import torch

from .token_stats import TokenStats, reference_head


def reference_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    entropy: bool = False,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    kl: bool = False,
    ref_entropy: bool = False,
    log_sum_sq_probs: bool = False,
    mean_logits: bool = False,
    is_top1: bool = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    compute_dtype: torch.dtype | None = None,
) -> TokenStats:
    """Same contract as :func:`fastpref.token_stats`, computed over every position.

    ``compute_dtype`` (e.g. ``torch.float64``) upcasts the inputs before the GEMM; by default the
    logits are computed in the input dtype and upcast to fp32 afterwards, as eager HF/TRL code does.
    """
    mask = labels != ignore_index
    target = labels.masked_fill(~mask, 0).long()

    def log_probs(h, w, b):
        if compute_dtype is not None:
            h, w = h.to(compute_dtype), w.to(compute_dtype)
            b = None if b is None else b.to(compute_dtype)
        z = h @ w.T
        if b is not None:
            z = z + b
        z = z.to(compute_dtype or torch.float32) * logit_scale
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        z = z / temperature
        return z, torch.log_softmax(z, dim=-1)

    z, logq = log_probs(hidden, weight, bias)
    q = logq.exp()

    def masked(x):  # fp32 like the fused op, or the oracle's own precision when upcast
        return x.masked_fill(~mask, 0).to(compute_dtype or torch.float32)

    fields = {"logp": masked(logq.gather(-1, target[..., None]).squeeze(-1))}
    if entropy:
        fields["entropy"] = masked(-(q * logq).sum(-1))
    if log_sum_sq_probs:
        fields["log_sum_sq_probs"] = masked(torch.log((q * q).sum(-1))).detach()
    if mean_logits:
        fields["mean_logits"] = masked(z.mean(-1)).detach()
    if is_top1:
        fields["is_top1"] = (z.argmax(-1) == target) & mask
    if ref_hidden is not None:
        with torch.no_grad():
            _, logr = log_probs(ref_hidden, *reference_head(weight, bias, ref_weight, ref_bias))
        fields["ref_logp"] = masked(logr.gather(-1, target[..., None]).squeeze(-1))
        if ref_entropy:
            fields["ref_entropy"] = masked(-(logr.exp() * logr).sum(-1))
        if kl:
            fields["kl"] = masked((logr.exp() * (logr - logq)).sum(-1))
    return TokenStats(**fields)
