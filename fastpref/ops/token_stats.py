"""Level 1: per-token statistics straight from hidden states and the LM-head weight.

The only O(N·V·d) work in fastpref. Valid rows (label != ignore_index) are compacted, then processed in
row chunks: ``z = h_chunk @ W.T (+ bias)`` on the vendor GEMM and one fused pass of the backend's row
kernel for the statistics; only O(chunk) fp32 vectors are kept.

Backward, exact in every mode:

* rows whose logits were kept (``logits_budget``) are turned into dL/dz in place, then ``dz @ W`` and
  ``dz^T @ h`` run once over all of them: the 3-GEMM floor;
* the other rows are recomputed in tiles of (row block x vocabulary slice): per slice, the slice of
  grad_W is one GEMM over all rows, written once, so a bf16 head needs no full-size fp32 grad_W
  accumulator (only an fp32 ``[slice, d]`` one when the rows need several blocks, and an fp32
  ``[rows, d]`` one for grad_hidden, which sums over slices);
* a frozen head (LoRA) with a single differentiable statistic keeps the hidden-space gradient
  (``dz @ W`` with unit upstream gradient, M x d) from the forward instead: 2 GEMMs in all.
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

DEFAULT_CHUNK_BYTES = 128 * 2**20  # fp32 bytes of one chunk (or backward tile) of logits on CPU
_TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


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

    def kernel_args(self) -> dict:
        return {"softcap": self.softcap, "post_scale": self.post_scale}


def _project(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, scale: float, out: torch.Tensor) -> torch.Tensor:
    """``out = scale * (h @ w.T + b)`` in the input dtype (fp32 accumulate inside the GEMM)."""
    if b is None and scale == 1.0:
        torch.mm(h, w.t(), out=out)
    elif b is None:  # the scale inside the GEMM (beta=0 ignores the old contents of out)
        torch.addmm(out, h, w.t(), beta=0.0, alpha=scale, out=out)
    else:
        torch.addmm(b, h, w.t(), beta=scale, alpha=scale, out=out)
    return out


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as fp32, without rounding the product to a low-precision input dtype first."""
    if a.is_cuda and _TORCH_VERSION >= (2, 8):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for an fp32 ``acc``; in place on cuBLAS from torch 2.10 (pytorch#167931)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda and _TORCH_VERSION >= (2, 10):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += _mm_fp32(a, b)


def _gemm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out = a @ b`` or ``out += a @ b``; an fp32 ``out`` takes low-precision products unrounded."""
    if accumulate:
        _addmm_fp32(out, a, b)
    elif a.dtype == out.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(_mm_fp32(a, b))


def _chunks(start: int, stop: int, step: int) -> list[tuple[int, int]]:
    return [(s, min(s + step, stop)) for s in range(start, stop, step)]


def _kept_rows(plan: _Plan, m: int, vocab: int, element_size: int) -> int:
    """How many leading rows keep their logits (whole chunks, within ``logits_budget``)."""
    per_row = vocab * element_size * (2 if plan.want.kl else 1)
    rows = min(m, plan.logits_budget // per_row)
    return rows if rows == m else rows - rows % plan.chunk_rows


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
        diff_stats = _differentiable(plan)
        # Frozen head (LoRA) with one differentiable stat: keep dz @ W (M x d) instead of any logits.
        pieces = needs_grad and not any(ctx.needs_input_grad[1:3]) and len(diff_stats) == 1
        kept = _kept_rows(plan, m, vocab, h.element_size()) if needs_grad and not pieces else 0
        kept_z = h.new_empty((kept, vocab))
        kept_zr = h_ref.new_empty((kept, vocab)) if plan.has_ref and plan.want.kl else None
        work = h.new_empty((min(m - kept, plan.chunk_rows), vocab))
        work_ref = h_ref.new_empty(work.shape) if plan.has_ref else None
        grad_pieces = torch.empty_like(h) if pieces else None
        if kept:  # one GEMM over all kept rows: bigger GEMMs run faster than chunk-sized ones
            _project(h[:kept], w, b, plan.scale, kept_z)
            if kept_zr is not None:
                _project(h_ref[:kept], w_ref, b_ref, plan.scale, kept_zr)
        for s, e in _chunks(0, kept, plan.chunk_rows) + _chunks(kept, m, plan.chunk_rows):
            z = kept_z[s:e] if e <= kept else _project(h[s:e], w, b, plan.scale, work[: e - s])
            zr = None
            if kept_zr is not None and e <= kept:
                zr = kept_zr[s:e]
            elif plan.has_ref:
                zr = _project(h_ref[s:e], w_ref, b_ref, plan.scale, work_ref[: e - s])
            stats = plan.rows.forward_rows(z, y[s:e], want=plan.want, ref_logits=zr, **plan.kernel_args())
            for k, v in stats.items():
                outs[k][s:e] = v
            if pieces:  # unit upstream gradient of the one differentiable stat
                unit = {f"g_{diff_stats[0]}": torch.ones(e - s, device=h.device)}
                _backward_rows(plan, z, zr, y[s:e], {k: v[s:e] for k, v in outs.items()}, unit)
                torch.mm(z, w, out=grad_pieces[s:e])
        ctx.plan, ctx.kept, ctx.pieces = plan, kept, grad_pieces
        ctx.kept_logits = (kept_z, kept_zr) if kept else None
        ctx.save_for_backward(h, w, b, y, h_ref, w_ref, b_ref, *(outs.get(k) for k in ("lse", "entropy", "ref_lse")))
        ctx.mark_non_differentiable(*(outs[k] for k in _OUTPUTS if k in outs and k not in diff_stats))
        return tuple(outs.get(k) for k in _OUTPUTS)

    @staticmethod
    def backward(ctx, g_logp, g_entropy, _g_ref_logp, _g_ref_entropy, g_kl, *_rest):
        plan: _Plan = ctx.plan
        h, w, b, y, h_ref, w_ref, b_ref, lse, entropy, ref_lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        # The logit scale multiplies every dz row: fold it into the per-row upstream gradients.
        grads = {f"g_{k}": g.float() * plan.scale for k, g in (("logp", g_logp), ("entropy", g_entropy), ("kl", g_kl))
                 if g is not None}
        if not grads:
            return (None,) * 8
        if ctx.pieces is not None:
            (g,) = grads.values()
            return (ctx.pieces * g[:, None]).to(h.dtype), None, None, None, None, None, None, None

        m, vocab = h.shape[0], w.shape[0]
        row_stats = {"lse": lse, "entropy": entropy, "ref_lse": ref_lse}
        # Every element of grad_h / grad_W is written by a GEMM below (no zero-fill), except with no rows.
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = (torch.empty_like(w) if m else torch.zeros_like(w)) if need_w else None
        grad_b = torch.zeros(vocab, device=w.device, dtype=torch.float32) if need_b else None

        kept = ctx.kept if ctx.kept_logits is not None else 0  # kept logits are consumed by the first backward
        if kept:
            kept_z, kept_zr = ctx.kept_logits
            ctx.kept_logits = None
            for s, e in _chunks(0, kept, plan.chunk_rows):
                zr = kept_zr[s:e] if kept_zr is not None else None
                _backward_rows(plan, kept_z[s:e], zr, y[s:e], _rows(row_stats, s, e), _rows(grads, s, e))
            if need_h:
                torch.mm(kept_z, w, out=grad_h[:kept])
            if need_w:
                torch.mm(kept_z.t(), h[:kept], out=grad_w)
            if need_b:
                grad_b += kept_z.sum(0, dtype=torch.float32)
            del kept_z, kept_zr

        rest = m - kept
        if rest:
            # Tiles of about one chunk: a vocabulary slice over as many rows as fit (all, when they do).
            # Low-precision heads accumulate in fp32 only what sums over several GEMMs.
            tile = plan.chunk_rows * vocab
            width = min(vocab, max(tile // rest, 512))
            block = min(rest, max(1, tile // width))
            low_precision = h.dtype != torch.float32
            separate_h = low_precision and width < vocab
            separate_w = low_precision and (block < rest or kept > 0)
            if need_h:
                acc_h = torch.empty(rest, h.shape[1], device=h.device) if separate_h else grad_h[kept:]
            buf = h.new_empty((block, width))
            buf_ref = h_ref.new_empty((block, width)) if "g_kl" in grads else None
            for v0, v1 in _chunks(0, vocab, width):
                w_slice = w[v0:v1]
                if need_w:
                    acc_w = grad_w[v0:v1]
                    if separate_w:
                        acc_w = acc_w.float() if kept else torch.empty(acc_w.shape, device=w.device)
                for i, (s, e) in enumerate(_chunks(kept, m, block)):
                    bias = None if b is None else b[v0:v1]
                    z = _project(h[s:e], w_slice, bias, plan.scale, buf[: e - s, : v1 - v0])
                    zr = None
                    if buf_ref is not None:
                        ref_bias = None if b_ref is None else b_ref[v0:v1]
                        zr = _project(h_ref[s:e], w_ref[v0:v1], ref_bias, plan.scale, buf_ref[: e - s, : v1 - v0])
                    # targets outside this slice get no one-hot term (backend contract)
                    _backward_rows(plan, z, zr, y[s:e] - v0, _rows(row_stats, s, e), _rows(grads, s, e))
                    if need_h:
                        _gemm(acc_h[s - kept : e - kept], z, w_slice, accumulate=v0 > 0)
                    if need_w:
                        _gemm(acc_w, z.t(), h[s:e], accumulate=kept > 0 or i > 0)
                    if need_b:
                        grad_b[v0:v1] += z.sum(0, dtype=torch.float32)
                if need_w and separate_w:
                    grad_w[v0:v1] = acc_w
            if need_h and separate_h:
                grad_h[kept:] = acc_h
        return (
            grad_h,
            grad_w,
            grad_b.to(b.dtype) if need_b else None,
            None, None, None, None, None,
        )


def _rows(tensors: dict, s: int, e: int) -> dict:
    return {k: (None if v is None else v[s:e]) for k, v in tensors.items()}


def _backward_rows(plan: _Plan, z, zr, target, stats: dict, grads: dict) -> None:
    """dL/dz of one tile in place, for per-row upstream gradients ``grads`` (``g_logp``, ...)."""
    plan.rows.backward_rows_(
        z, target, stats["lse"],
        g_logp=grads.get("g_logp"),
        g_entropy=grads.get("g_entropy"),
        entropy=stats.get("entropy") if "g_entropy" in grads else None,
        g_kl=grads.get("g_kl"),
        ref_logits=zr if "g_kl" in grads else None,
        ref_lse=stats.get("ref_lse") if "g_kl" in grads else None,
        **plan.kernel_args(),
    )


def _differentiable(plan: _Plan) -> list[str]:
    """The outputs that carry gradients for this plan."""
    asked = {"logp": True, "entropy": plan.want.entropy and not plan.detach_entropy, "kl": plan.want.kl}
    return [k for k in _DIFFERENTIABLE if asked[k]]


def _row_outputs(plan: _Plan) -> list[str]:
    """Keys the backend's ``forward_rows`` returns for this plan."""
    keys = ["lse", "logp"] + [f.name for f in dataclasses.fields(plan.want) if getattr(plan.want, f.name)]
    return keys + (["ref_lse", "ref_logp"] if plan.has_ref else [])


def default_chunk_rows(vocab: int, device: torch.device | str = "cpu", element_size: int = 4,
                       chunk_bytes: int | None = None) -> int:
    """Rows per chunk: ``chunk_bytes`` of fp32 logits on CPU (default 128 MiB, the C++ backend asks
    for 256 MiB: it has no chunk-sized temporaries); 512 MiB in the input dtype on CUDA.

    GPUs need a few thousand rows per chunk so that each GEMM reuses every byte of ``W`` it reads
    (at V=128k in bf16: ~2048 rows); on CPU a chunk of 256-512 rows already runs MKL near its peak.
    """
    if torch.device(device).type == "cuda":
        rows = (512 * 2**20) // (element_size * vocab)
    else:
        rows = (chunk_bytes or DEFAULT_CHUNK_BYTES) // (4 * vocab)
    rows = max(1, rows)
    return rows - rows % 16 if rows >= 64 else rows


@torch._disable_dynamo  # = torch.compiler.disable, but imports dynamo on first call rather than at import
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
        chunk_size: rows per chunk (default: :func:`default_chunk_rows`: 256 MiB of fp32 logits with the
            C++ backend, 128 MiB with the PyTorch one, ~512 MiB in the input dtype on CUDA); the
            backward tiles hold about as many logits.
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
    _, rows = dispatch.resolve(hidden.device, backend)
    num_valid, valid = _checks.check_token_inputs(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, ref_hidden=ref_hidden,
        ref_weight=ref_weight, ref_bias=ref_bias, kl=kl, ref_entropy=ref_entropy,
        logits_budget=logits_budget, chunk_size=chunk_size, softcap=softcap, temperature=temperature,
        # a vocabulary-parallel backend holds one shard of the head: labels span its full vocabulary
        vocab_size=getattr(rows, "vocab_size", None),
    )
    d, vocab = hidden.shape[-1], weight.shape[0]
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
        # From the full vocabulary: the ranks of a vocabulary-parallel head must agree on the chunks.
        chunk_rows=chunk_size or default_chunk_rows(getattr(rows, "vocab_size", None) or vocab, hidden.device,
                                                    hidden.element_size(), getattr(rows, "CHUNK_BYTES", None)),
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
