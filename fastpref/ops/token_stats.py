"""Level 1: per-token statistics straight from hidden states and the LM-head weight.

The only O(N·V·d) work in fastpref. Valid rows (label != ignore_index) are compacted, then processed in
chunks: ``z = h_chunk @ W.T (+ bias)`` on the vendor GEMM, one fused row pass (backend row kernels) for
the statistics, and only O(chunk) fp32 vectors are kept. The backward recomputes (or reuses) each chunk,
turns it into dL/dz in place and runs the two gradient GEMMs, with grad_W accumulated in fp32.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import torch

from .. import _checks
from . import dispatch
from .dispatch import Want

DEFAULT_CHUNK_BYTES = 128 * 2**20  # fp32 bytes of one chunk of logits


class TokenStats(NamedTuple):
    """Per-token fp32 statistics, shaped like ``labels``, zero at ignored positions; None when not asked.

    ``logp``, ``entropy`` and ``kl`` are differentiable (w.r.t. hidden, weight, bias); the reference
    fields, ``log_sum_sq_probs``, ``mean_logits`` and ``is_top1`` (bool) carry no gradient.
    """

    logp: torch.Tensor
    entropy: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    ref_entropy: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None


_OUTPUTS = TokenStats._fields
_DIFFERENTIABLE = ("logp", "entropy", "kl")


@dataclass
class _Plan:
    """Everything the autograd Function needs besides tensors."""

    rows: ModuleType  # backend row kernels (see fastpref.ops.dispatch)
    want: Want
    has_ref: bool
    detach_entropy: bool
    chunk_rows: int
    logits_budget: int
    scale: float  # multiplies (h W^T + b) in the GEMM
    softcap: float
    post_scale: float


def _project(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, scale: float, out: torch.Tensor) -> torch.Tensor:
    """``out = scale * (h @ w.T + b)`` in the input dtype (fp32 accumulate inside the GEMM)."""
    if b is None:
        torch.mm(h, w.t(), out=out)
        if scale != 1.0:
            out.mul_(scale)
    else:
        torch.addmm(b, h, w.t(), beta=scale, alpha=scale, out=out)
    return out


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with fp32 accumulation for bf16/fp16 operands (no per-chunk rounding of grad_W)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:  # no mixed-dtype GEMM on CPU
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _chunks(m: int, chunk_rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_rows, m)) for s in range(0, m, chunk_rows)]


class _TokenStatsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, y, h_ref, w_ref, b_ref, plan: _Plan):
        ctx.set_materialize_grads(False)
        m, vocab = h.shape[0], w.shape[0]
        outs = {
            k: torch.empty(m, device=h.device, dtype=torch.bool if k == "is_top1" else torch.float32)
            for k in _row_outputs(plan)
        }
        needs_grad = any(ctx.needs_input_grad[:3])
        # Frozen head (LoRA): no grad_W, so keep the hidden-space gradient pieces (M x d) instead of logits.
        frozen = needs_grad and not ctx.needs_input_grad[1] and not ctx.needs_input_grad[2]
        diff_stats = _differentiable(plan)
        pieces = {k: torch.empty_like(h) for k in diff_stats} if frozen else {}
        kept: list[tuple[torch.Tensor, torch.Tensor | None] | None] = []
        kept_bytes = 0
        work = h.new_empty((min(m, plan.chunk_rows), vocab))
        work_ref = h_ref.new_empty((min(m, plan.chunk_rows), vocab)) if plan.has_ref else None
        for s, e in _chunks(m, plan.chunk_rows):
            chunk_bytes = (e - s) * vocab * h.element_size() * (2 if plan.want.kl else 1)
            keep = needs_grad and not frozen and kept_bytes + chunk_bytes <= plan.logits_budget
            z = _project(h[s:e], w, b, plan.scale, h.new_empty((e - s, vocab)) if keep else work[: e - s])
            zr = None
            if plan.has_ref:
                fresh = keep and plan.want.kl
                out = h_ref.new_empty((e - s, vocab)) if fresh else work_ref[: e - s]
                zr = _project(h_ref[s:e], w_ref, b_ref, plan.scale, out)
            stats = plan.rows.forward_rows(
                z, y[s:e], want=plan.want, ref_logits=zr, softcap=plan.softcap, post_scale=plan.post_scale
            )
            for k, v in stats.items():
                outs[k][s:e] = v
            if keep:
                kept.append((z, zr if plan.want.kl else None))
                kept_bytes += chunk_bytes
            elif needs_grad:
                kept.append(None)
            if frozen:
                _pieces_for_chunk(plan, pieces, z, zr, w, y[s:e], {k: v[s:e] for k, v in outs.items()}, s, e)
        ctx.plan, ctx.kept, ctx.frozen, ctx.pieces = plan, kept, frozen, pieces
        ctx.save_for_backward(
            h, w, b, y, outs["lse"], outs.get("entropy"), h_ref, w_ref, b_ref, outs.get("ref_lse")
        )
        result = tuple(outs.get(k) for k in _OUTPUTS)
        ctx.mark_non_differentiable(*(outs[k] for k in _OUTPUTS if k in outs and k not in _differentiable(plan)))
        return result

    @staticmethod
    def backward(ctx, g_logp, g_entropy, _g_ref_logp, _g_ref_entropy, g_kl, *_rest):
        plan: _Plan = ctx.plan
        h, w, b, y, lse, entropy, h_ref, w_ref, b_ref, ref_lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grads = {"logp": g_logp, "entropy": g_entropy, "kl": g_kl}
        if all(g is None for g in grads.values()):
            return (None,) * 8
        # The logit scale multiplies every dz row: fold it into the per-row coefficients.
        coef = {k: (g.float() * plan.scale if plan.scale != 1.0 else g.float()) for k, g in grads.items() if g is not None}
        if ctx.frozen:
            grad_h = torch.zeros(h.shape, device=h.device, dtype=torch.float32)
            for k, g in coef.items():
                grad_h.addcmul_(ctx.pieces[k], g[:, None])
            return grad_h.to(h.dtype), None, None, None, None, None, None, None

        m, vocab = h.shape[0], w.shape[0]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, device=w.device, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros(vocab, device=w.device, dtype=torch.float32) if need_b else None
        work = work_ref = None
        for i, (s, e) in enumerate(_chunks(m, plan.chunk_rows)):
            z, zr = ctx.kept[i] if ctx.kept[i] is not None else (None, None)
            ctx.kept[i] = None  # consumed (dz is written in place); a second backward recomputes
            if z is None:
                if work is None:
                    work = h.new_empty((min(m, plan.chunk_rows), vocab))
                z = _project(h[s:e], w, b, plan.scale, work[: e - s])
            if "kl" in coef and zr is None:
                if work_ref is None:
                    work_ref = h_ref.new_empty((min(m, plan.chunk_rows), vocab))
                zr = _project(h_ref[s:e], w_ref, b_ref, plan.scale, work_ref[: e - s])
            plan.rows.backward_rows_(
                z,
                y[s:e],
                lse[s:e],
                g_logp=coef["logp"][s:e] if "logp" in coef else None,
                g_entropy=coef["entropy"][s:e] if "entropy" in coef else None,
                entropy=entropy[s:e] if "entropy" in coef else None,
                g_kl=coef["kl"][s:e] if "kl" in coef else None,
                ref_logits=zr if "kl" in coef else None,
                ref_lse=ref_lse[s:e] if "kl" in coef else None,
                softcap=plan.softcap,
                post_scale=plan.post_scale,
            )
            if need_h:
                torch.mm(z, w, out=grad_h[s:e])
            if need_w:
                _accumulate_fp32(grad_w, z.t(), h[s:e])
            if need_b:
                grad_b += z.sum(0, dtype=torch.float32)
        return (
            grad_h,
            grad_w.to(w.dtype) if need_w else None,
            grad_b.to(b.dtype) if need_b else None,
            None, None, None, None, None,
        )


def _differentiable(plan: _Plan) -> list[str]:
    """The outputs that carry gradients for this plan."""
    asked = {"logp": True, "entropy": plan.want.entropy and not plan.detach_entropy, "kl": plan.want.kl}
    return [k for k in _DIFFERENTIABLE if asked[k]]


def _row_outputs(plan: _Plan) -> list[str]:
    """Keys the backend's ``forward_rows`` returns for this plan."""
    keys = ["lse", "logp"] + [f.name for f in dataclasses.fields(plan.want) if getattr(plan.want, f.name)]
    return keys + (["ref_lse", "ref_logp"] if plan.has_ref else [])


def _pieces_for_chunk(plan, pieces, z, zr, w, y, stats, s, e):
    """Frozen head: per-token hidden-space gradients of each differentiable stat (unit upstream grad)."""
    names = list(pieces)
    ones = torch.ones(e - s, device=z.device, dtype=torch.float32)
    for i, k in enumerate(names):
        dz = z if i == len(names) - 1 else z.clone()  # the last piece may consume the chunk
        ref = None
        if k == "kl":
            ref = zr if i == len(names) - 1 else zr.clone()
        plan.rows.backward_rows_(
            dz,
            y,
            stats["lse"],
            g_logp=ones if k == "logp" else None,
            g_entropy=ones if k == "entropy" else None,
            entropy=stats.get("entropy") if k == "entropy" else None,
            g_kl=ones if k == "kl" else None,
            ref_logits=ref,
            ref_lse=stats.get("ref_lse") if k == "kl" else None,
            softcap=plan.softcap,
            post_scale=plan.post_scale,
        )
        torch.mm(dz, w, out=pieces[k][s:e])


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk so that one chunk of fp32 logits is about ``DEFAULT_CHUNK_BYTES``."""
    rows = max(1, DEFAULT_CHUNK_BYTES // (4 * vocab))
    return rows - rows % 16 if rows >= 64 else rows


@torch.compiler.disable
def token_stats(
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
    logits_budget: int = 0,
    chunk_size: int | None = None,
    ref_entropy: bool = False,
    detach_entropy: bool = False,
    log_sum_sq_probs: bool = False,
    mean_logits: bool = False,
    is_top1: bool = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    backend: str | None = None,
) -> TokenStats:
    r"""Per-token log-probs (and entropies, reference stats, KL) of ``softmax(hidden @ weight.T + bias)``.

    Never materialises the ``[N, V]`` logits: only rows whose label is not ``ignore_index`` go through
    the GEMMs, ``chunk_size`` rows at a time.

    Args:
        hidden: ``[..., d]`` final hidden states, aligned with ``labels`` (position t predicts
            ``labels[t]``; see :func:`fastpref.shift_labels`). fp32, bf16 or fp16.
        weight: ``[V, d]`` LM-head weight, same dtype and device as ``hidden``.
        labels: ``[...]`` integer targets in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` LM-head bias.
        entropy: also return the policy entropy ``H_t`` (differentiable).
        ref_hidden, ref_weight, ref_bias: a frozen reference head evaluated in the same pass
            (``ref_weight`` defaults to ``weight``); gives ``ref_logp``. Never receives gradients.
        kl: return ``KL(p_ref,t || p_t)`` per token (needs the reference; differentiable w.r.t. the policy).
        ref_entropy: return the reference entropy (no gradient).
        detach_entropy: return ``entropy`` without gradient (for metrics; with a frozen head this
            saves one GEMM).
        log_sum_sq_probs, mean_logits, is_top1: no-grad extras (WPO weights and TRL's metrics).
        logits_budget: bytes of chunk logits the backward may keep instead of recomputing them
            (0 = always recompute: 4 GEMMs; enough for all chunks: 3 GEMMs).
        chunk_size: rows per chunk (default: about 128 MiB of fp32 logits).
        logit_scale, softcap, temperature: the softmax sees
            ``softcap * tanh(logit_scale * (h W^T + b) / softcap) / temperature`` (no tanh when
            ``softcap`` is None), the conventions of Gemma-style heads and TRL's fused head.
        backend: ``"torch"``, ``"triton"`` or ``"cpp"`` row kernels (default: by device, or the
            ``FASTPREF_BACKEND`` environment variable).

    Returns:
        :class:`TokenStats` with fp32 tensors shaped like ``labels``, zero at ignored positions.

    The only host synchronisation is one read of the valid-token count (with the input checks).
    """
    ref_weight = weight if ref_hidden is not None and ref_weight is None else ref_weight
    num_valid, valid = _checks.check_token_inputs(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, ref_hidden=ref_hidden,
        ref_weight=ref_weight, ref_bias=ref_bias, kl=kl, ref_entropy=ref_entropy,
        logits_budget=logits_budget, chunk_size=chunk_size, softcap=softcap, temperature=temperature,
    )
    d, vocab = hidden.shape[-1], weight.shape[0]
    _, rows = dispatch.resolve(hidden.device, backend)
    want = Want(entropy, log_sum_sq_probs, mean_logits, is_top1, ref_entropy, kl)
    if softcap:
        scale, post_scale = float(logit_scale), 1.0 / temperature
    else:
        scale, post_scale = float(logit_scale) / temperature, 1.0
    plan = _Plan(
        rows=rows,
        want=want,
        has_ref=ref_hidden is not None,
        detach_entropy=bool(detach_entropy),
        chunk_rows=chunk_size or default_chunk_rows(vocab),
        logits_budget=int(logits_budget),
        scale=scale,
        softcap=float(softcap or 0.0),
        post_scale=post_scale,
    )
    flat_valid = valid.reshape(-1)
    index = torch.nonzero_static(flat_valid, size=num_valid).squeeze(1)
    h = hidden.reshape(-1, d).index_select(0, index)
    y = labels.reshape(-1).index_select(0, index).long()
    if ref_hidden is not None:
        h_ref = ref_hidden.detach().reshape(-1, ref_hidden.shape[-1]).index_select(0, index)
        w_ref, b_ref = ref_weight.detach(), None if ref_bias is None else ref_bias.detach()
    else:
        h_ref = w_ref = b_ref = None
    outs = _TokenStatsFunction.apply(h, weight, bias, y, h_ref, w_ref, b_ref, plan)

    def scatter(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        full = x.new_zeros(flat_valid.shape[0]).index_copy(0, index, x)
        return full.view(labels.shape)

    stats = dict(zip(_OUTPUTS, outs))
    asked = {
        "logp": True, "entropy": entropy, "ref_logp": ref_hidden is not None, "ref_entropy": ref_entropy,
        "kl": kl, "log_sum_sq_probs": log_sum_sq_probs, "mean_logits": mean_logits, "is_top1": is_top1,
    }
    return TokenStats(**{k: scatter(stats[k]) if asked[k] else None for k in _OUTPUTS})


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``labels[..., 1:]`` padded with ``ignore_index``: aligns HF-style labels with unshifted hidden states."""
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


__all__ = ["TokenStats", "token_stats", "shift_labels", "default_chunk_rows"]
