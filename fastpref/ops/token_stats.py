"""Level 1: per-token statistics straight from hidden states and the LM-head weight.

The only O(N·V·d) work in fastpref. Valid rows (label != ignore_index) are compacted, then processed in
row chunks: ``z = h_chunk @ W.T (+ bias)`` on the vendor GEMM and one fused pass of the backend's row
kernel (:class:`fastpref.ops.backend.RowKernels`) for the statistics; only O(chunk) vectors are kept.

Backward, exact in every mode (:mod:`fastpref.ops.tiles` decides the sizes):

* rows whose logits were kept (``logits_budget``) are turned into dL/dz in place, then ``dz @ W`` and
  ``dz^T @ h`` run once over all of them: the 3-GEMM floor (:func:`_backward_kept`);
* the other rows are recomputed in tiles of (row block x vocabulary slice), each grad_W slice written by
  one GEMM (:func:`_backward_recomputed`);
* a frozen head (LoRA) with a single differentiable statistic keeps the hidden-space gradient
  (``dz @ W`` with unit upstream gradient, M x d) from the forward instead: 2 GEMMs in all.

The op is registered with ``torch.library`` as ``fastpref::token_stats`` (with a fake implementation
and its autograd formula), so ``torch.compile(fullgraph=True)`` traces through it without a graph
break. Vocabulary-parallel heads run the same code through a plain ``autograd.Function`` instead: their
collectives need a process group, which an op schema cannot carry (so they graph-break under compile).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import _checks
from . import backend as registry
from .backend import RowKernels, Want
from .tiles import backward_tiles, kept_rows, spans

_TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


class TokenStats(NamedTuple):
    """Per-token statistics shaped like ``labels``, zero at ignored positions; None when not asked.

    fp32 (fp64 for fp64 inputs). ``logp``, ``entropy`` and ``kl`` are differentiable (w.r.t. hidden,
    weight, bias); the reference fields, ``log_sum_sq_probs``, ``mean_logits`` and ``is_top1`` (bool)
    carry no gradient.
    """

    logp: torch.Tensor
    entropy: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    ref_entropy: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None


STATS = TokenStats._fields
# What the forward returns besides the statistics: row log-sum-exps for the backward, the kept logits,
# and the frozen head's hidden-space gradient. Absent entries are empty tensors (an op returns tensors).
SAVED = ("lse", "ref_lse", "kept_logits", "kept_ref_logits", "hidden_grad")
_GRAD_H, _GRAD_W, _GRAD_B = 1, 2, 4  # bits of ``needs_grad``
_WANT = tuple(f.name for f in dataclasses.fields(Want))  # bit order of the op's ``want`` argument


@dataclass(frozen=True)
class Settings:
    """Everything the op needs besides tensors (what the custom op's scalar arguments encode)."""

    want: Want
    detach_entropy: bool
    ignore_index: int
    chunk_rows: int
    logits_budget: int
    scale: float  # multiplies (h W^T + b) in the GEMM
    softcap: float
    post_scale: float

    def kernel_args(self) -> dict:
        return {"softcap": self.softcap, "post_scale": self.post_scale}

    def differentiable(self) -> list[str]:
        """The statistics that carry gradients."""
        asked = {"logp": True, "entropy": self.want.entropy and not self.detach_entropy, "kl": self.want.kl}
        return [k for k, on in asked.items() if on]

    def row_outputs(self, has_ref: bool) -> list[str]:
        """Keys the backend's ``forward_rows`` returns."""
        keys = ["lse", "logp"] + [k for k in _WANT if getattr(self.want, k)]
        return keys + (["ref_lse", "ref_logp"] if has_ref else [])

    def encode(self) -> tuple:
        """The op's scalar arguments (see ``_SCHEMA``)."""
        bits = sum(1 << i for i, k in enumerate(_WANT) if getattr(self.want, k))
        return (self.ignore_index, bits, self.detach_entropy, self.chunk_rows, self.logits_budget, self.scale,
                self.softcap, self.post_scale)

    @classmethod
    def decode(cls, ignore_index, want_bits, detach_entropy, chunk_rows, logits_budget, scale, softcap, post_scale):
        want = Want(**{k: bool(want_bits >> i & 1) for i, k in enumerate(_WANT)})
        return cls(want, detach_entropy, ignore_index, chunk_rows, logits_budget, scale, softcap, post_scale)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


# ---- GEMM helpers ----


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


def _rows(tensors: dict, s: int, e: int) -> dict:
    return {k: (None if v is None else v[s:e]) for k, v in tensors.items()}


def _backward_rows(rows: RowKernels, settings: Settings, z, zr, target, stats: dict, grads: dict) -> None:
    """dL/dz of one tile in place, for per-row upstream gradients ``grads`` (``g_logp``, ...)."""
    rows.backward_rows_(
        z, target, stats["lse"],
        g_logp=grads.get("g_logp"),
        g_entropy=grads.get("g_entropy"),
        entropy=stats.get("entropy") if "g_entropy" in grads else None,
        g_kl=grads.get("g_kl"),
        ref_logits=zr if "g_kl" in grads else None,
        ref_lse=stats.get("ref_lse") if "g_kl" in grads else None,
        **settings.kernel_args(),
    )


# ---- the computation on compacted rows ----


@dataclass
class _Compacted:
    """The valid rows of one call: ``index`` into the flattened positions, their hidden states and targets."""

    index: torch.Tensor
    h: torch.Tensor
    y: torch.Tensor
    h_ref: torch.Tensor | None

    @classmethod
    def of(cls, hidden, labels, ref_hidden, ignore_index: int, vocab_size: int) -> _Compacted:
        flat = labels.reshape(-1)
        valid = flat != ignore_index
        bad = valid & ((flat < 0) | (flat >= vocab_size))
        num_valid, has_bad = torch.stack([valid.sum(), bad.any()]).tolist()  # the one host sync before the GEMMs
        if has_bad:
            _checks.fail("labels", f"has values outside [0, {vocab_size}) that are not ignore_index={ignore_index}: "
                                   f"{flat[bad][:5].tolist()}")
        index = torch.nonzero_static(valid, size=num_valid).squeeze(1)
        d = hidden.shape[-1]
        h_ref = None if ref_hidden is None else ref_hidden.reshape(-1, d).index_select(0, index)
        return cls(index, hidden.reshape(-1, d).index_select(0, index), flat.index_select(0, index).long(), h_ref)

    def scatter(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Compact rows ``x`` back to the positions of ``like`` (zeros elsewhere)."""
        full = x.new_zeros((like.numel(),) + x.shape[1:]).index_copy(0, self.index, x)
        return full.view(like.shape + x.shape[1:])


def _forward(rows: RowKernels, settings: Settings, c: _Compacted, w, b, w_ref, b_ref, needs_grad: int) -> dict:
    """Statistics of the compacted rows, and what the backward needs (see ``SAVED``)."""
    h, y, h_ref = c.h, c.y, c.h_ref
    m, vocab = h.shape[0], w.shape[0]
    has_ref = h_ref is not None
    dtype = stat_dtype(h.dtype)
    outs = {k: torch.empty(m, device=h.device, dtype=torch.bool if k == "is_top1" else dtype)
            for k in settings.row_outputs(has_ref)}
    diff = settings.differentiable()
    # Frozen head (LoRA) with one differentiable stat: keep dz @ W (M x d) instead of any logits.
    frozen = needs_grad == _GRAD_H and len(diff) == 1
    kept = 0
    if needs_grad and not frozen:
        kept = kept_rows(m, vocab, h.element_size(), settings.logits_budget, settings.chunk_rows,
                         ref_logits=has_ref and settings.want.kl)
    kept_z = h.new_empty((kept, vocab))
    kept_zr = h_ref.new_empty((kept, vocab)) if has_ref and settings.want.kl else h.new_empty((0, vocab))
    work = h.new_empty((min(m - kept, settings.chunk_rows), vocab))
    work_ref = h_ref.new_empty(work.shape) if has_ref else None
    hidden_grad = torch.empty_like(h) if frozen else None
    if kept:  # one GEMM over all kept rows: bigger GEMMs run faster than chunk-sized ones
        _project(h[:kept], w, b, settings.scale, kept_z)
        if kept_zr.numel():
            _project(h_ref[:kept], w_ref, b_ref, settings.scale, kept_zr)
    for s, e in spans(0, kept, settings.chunk_rows) + spans(kept, m, settings.chunk_rows):
        z = kept_z[s:e] if e <= kept else _project(h[s:e], w, b, settings.scale, work[: e - s])
        zr = None
        if e <= kept and kept_zr.numel():
            zr = kept_zr[s:e]
        elif has_ref:
            zr = _project(h_ref[s:e], w_ref, b_ref, settings.scale, work_ref[: e - s])
        stats = rows.forward_rows(z, y[s:e], want=settings.want, ref_logits=zr, **settings.kernel_args())
        for k, v in stats.items():
            outs[k][s:e] = v
        if frozen:  # unit upstream gradient of the one differentiable stat
            unit = {f"g_{diff[0]}": torch.ones(e - s, device=h.device, dtype=dtype)}
            _backward_rows(rows, settings, z, zr, y[s:e], _rows(outs, s, e), unit)
            torch.mm(z, w, out=hidden_grad[s:e])
    _check_finite(outs, c, w, b, w_ref, b_ref)
    outs.update(kept_logits=kept_z, kept_ref_logits=kept_zr, hidden_grad=hidden_grad)
    return outs


def _check_finite(outs: dict, c: _Compacted, w, b, w_ref, b_ref) -> None:
    """A NaN or Inf in any input the rows used makes their log-sum-exp non-finite: one small check
    (rows at ignored positions are never read, so they cannot raise). On failure, name the input."""
    lse = [outs["lse"]] + ([outs["ref_lse"]] if "ref_lse" in outs else [])
    if not lse[0].numel() or torch.isfinite(torch.cat(lse)).all():
        return
    named = {"hidden": c.h, "weight": w, "bias": b, "ref_hidden": c.h_ref, "ref_weight": w_ref, "ref_bias": b_ref}
    for name in _checks.non_finite(named):
        _checks.fail(name, "contains NaN or Inf (at a position whose label is not ignore_index)"
                     if name.endswith("hidden") else "contains NaN or Inf")
    _checks.fail("hidden", "gives non-finite logits (h @ weight.T overflows the input dtype)")


def _backward_kept(rows, settings, c: _Compacted, w, kept_z, kept_zr, stats, grads, grad_h, grad_w, grad_b) -> None:
    """The kept rows: dz in place of their logits, then one GEMM per gradient over all of them."""
    kept = kept_z.shape[0]
    for s, e in spans(0, kept, settings.chunk_rows):
        zr = kept_zr[s:e] if kept_zr.numel() else None
        _backward_rows(rows, settings, kept_z[s:e], zr, c.y[s:e], _rows(stats, s, e), _rows(grads, s, e))
    if grad_h is not None:
        torch.mm(kept_z, w, out=grad_h[:kept])
    if grad_w is not None:
        torch.mm(kept_z.t(), c.h[:kept], out=grad_w)
    if grad_b is not None:
        grad_b += kept_z.sum(0, dtype=grad_b.dtype)


def _backward_recomputed(rows, settings, c: _Compacted, w, b, w_ref, b_ref, kept: int, stats, grads,
                         grad_h, grad_w, grad_b) -> None:
    """Rows ``[kept, M)``: logits recomputed in tiles of (row block x vocabulary slice)."""
    h, y, h_ref = c.h, c.y, c.h_ref
    m, vocab = h.shape[0], w.shape[0]
    tiles = backward_tiles(m, vocab, settings.chunk_rows, h.dtype, kept)
    if grad_h is not None:
        acc_h = torch.empty(m - kept, h.shape[1], device=h.device) if tiles.fp32_grad_hidden else grad_h[kept:]
    buf = h.new_empty((tiles.block, tiles.width))
    buf_ref = h_ref.new_empty((tiles.block, tiles.width)) if "g_kl" in grads else None
    for v0, v1 in spans(0, vocab, tiles.width):
        w_slice = w[v0:v1]
        if grad_w is not None:
            acc_w = grad_w[v0:v1]
            if tiles.fp32_grad_weight:  # starts from the kept rows' part, when there is one
                acc_w = acc_w.float() if kept else torch.empty(acc_w.shape, device=w.device)
        for i, (s, e) in enumerate(spans(kept, m, tiles.block)):
            bias = None if b is None else b[v0:v1]
            z = _project(h[s:e], w_slice, bias, settings.scale, buf[: e - s, : v1 - v0])
            zr = None
            if buf_ref is not None:
                ref_bias = None if b_ref is None else b_ref[v0:v1]
                zr = _project(h_ref[s:e], w_ref[v0:v1], ref_bias, settings.scale, buf_ref[: e - s, : v1 - v0])
            # targets outside this slice get no one-hot term (backend contract)
            _backward_rows(rows, settings, z, zr, y[s:e] - v0, _rows(stats, s, e), _rows(grads, s, e))
            if grad_h is not None:
                _gemm(acc_h[s - kept: e - kept], z, w_slice, accumulate=v0 > 0)
            if grad_w is not None:
                _gemm(acc_w, z.t(), h[s:e], accumulate=kept > 0 or i > 0)
            if grad_b is not None:
                grad_b[v0:v1] += z.sum(0, dtype=grad_b.dtype)
        if grad_w is not None and tiles.fp32_grad_weight:
            grad_w[v0:v1] = acc_w
    if grad_h is not None and tiles.fp32_grad_hidden:
        grad_h[kept:] = acc_h


def _backward(rows, settings, c: _Compacted, w, b, w_ref, b_ref, stats: dict, grads: dict, kept, needs_grad: int):
    """``(grad_h [M, d], grad_w, grad_b)`` of the compacted rows (None where not needed).

    ``grads``: per-row upstream gradients ``g_logp`` / ``g_entropy`` / ``g_kl`` (already scaled);
    ``kept``: the forward's kept logits ``(kept_z, kept_zr)``, or None to recompute every row.
    """
    m, vocab = c.h.shape[0], w.shape[0]
    # Every element of grad_h / grad_W is written by a GEMM below (no zero-fill), except with no rows.
    grad_h = torch.empty_like(c.h) if needs_grad & _GRAD_H else None
    grad_w = (torch.empty_like(w) if m else torch.zeros_like(w)) if needs_grad & _GRAD_W else None
    grad_b = torch.zeros(vocab, device=w.device, dtype=stat_dtype(w.dtype)) if needs_grad & _GRAD_B else None
    num_kept = 0
    if kept is not None and kept[0].shape[0]:
        num_kept = kept[0].shape[0]
        _backward_kept(rows, settings, c, w, kept[0], kept[1], stats, grads, grad_h, grad_w, grad_b)
    if num_kept < m:
        _backward_recomputed(rows, settings, c, w, b, w_ref, b_ref, num_kept, stats, grads, grad_h, grad_w, grad_b)
    return grad_h, grad_w, None if grad_b is None else grad_b.to(b.dtype)


# ---- full-shaped entry points shared by the custom op and the autograd.Function ----


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def forward_full(rows, settings, vocab_size, hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias,
                 needs_grad: int) -> tuple[torch.Tensor, ...]:
    """The statistics (``STATS`` order, shaped like ``labels``) followed by ``SAVED`` (empty when absent)."""
    c = _Compacted.of(hidden, labels, ref_hidden, settings.ignore_index, vocab_size)
    outs = _forward(rows, settings, c, weight, bias, ref_weight, ref_bias, needs_grad)
    stats = tuple(c.scatter(outs[k], labels) if k in outs else _empty(hidden) for k in STATS)
    lse = c.scatter(outs["lse"], labels)
    ref_lse = c.scatter(outs["ref_lse"], labels) if "ref_lse" in outs else _empty(hidden)
    hidden_grad = outs["hidden_grad"]
    hidden_grad = _empty(hidden) if hidden_grad is None else c.scatter(hidden_grad, labels)
    return stats + (lse, ref_lse, outs["kept_logits"], outs["kept_ref_logits"], hidden_grad)


def backward_full(rows, settings, vocab_size, grads: dict, hidden, weight, bias, labels, ref_hidden, ref_weight,
                  ref_bias, lse, entropy, ref_lse, kept, needs_grad: int):
    """Full-shaped gradients ``(grad_hidden, grad_weight, grad_bias)`` for full-shaped upstream ``grads``."""
    c = _Compacted.of(hidden, labels, ref_hidden if "g_kl" in grads else None, settings.ignore_index, vocab_size)
    scale = settings.scale  # the logit scale multiplies every dz row: fold it into the upstream gradients
    compact = {k: (g.reshape(-1).index_select(0, c.index) * scale).to(stat_dtype(hidden.dtype))
               for k, g in grads.items()}
    stats = {"lse": lse.reshape(-1).index_select(0, c.index)}
    if "g_entropy" in compact:
        stats["entropy"] = entropy.reshape(-1).index_select(0, c.index)
    if "g_kl" in compact:
        stats["ref_lse"] = ref_lse.reshape(-1).index_select(0, c.index)
    grad_h, grad_w, grad_b = _backward(rows, settings, c, weight, bias, ref_weight, ref_bias, stats, compact, kept,
                                       needs_grad)
    return None if grad_h is None else c.scatter(grad_h, labels), grad_w, grad_b


# ---- the custom op ----

_LIB = torch.library.Library("fastpref", "DEF")
_SETTINGS_SCHEMA = ("int ignore_index, int want, bool detach_entropy, int chunk_rows, int logits_budget, "
                    "float scale, float softcap, float post_scale")
_LIB.define(
    "token_stats(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? ref_hidden, Tensor? ref_weight, "
    f"Tensor? ref_bias, {_SETTINGS_SCHEMA}, int needs_grad, str backend) -> ({', '.join(['Tensor'] * 13)})"
)
_LIB.define(
    "token_stats_backward(Tensor? g_logp, Tensor? g_entropy, Tensor? g_kl, Tensor hidden, Tensor weight, "
    "Tensor? bias, Tensor labels, Tensor? ref_hidden, Tensor? ref_weight, Tensor? ref_bias, Tensor lse, "
    "Tensor entropy, Tensor ref_lse, Tensor(a!) kept_logits, Tensor(b!) kept_ref_logits, bool use_kept, "
    f"{_SETTINGS_SCHEMA}, int needs_grad, str backend) -> (Tensor, Tensor, Tensor)"
)


def _op_forward(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, *settings_and_more):
    *encoded, needs_grad, backend = settings_and_more
    settings = Settings.decode(*encoded)
    with torch.autocast(hidden.device.type, enabled=False):  # the op runs at the dtypes it was given
        return forward_full(registry.kernels(backend), settings, weight.shape[0], hidden, weight, bias, labels,
                            ref_hidden, ref_weight, ref_bias, needs_grad)


def _op_backward(g_logp, g_entropy, g_kl, hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, lse,
                 entropy, ref_lse, kept_logits, kept_ref_logits, use_kept, *settings_and_more):
    *encoded, needs_grad, backend = settings_and_more
    settings = Settings.decode(*encoded)
    grads = {k: g for k, g in (("g_logp", g_logp), ("g_entropy", g_entropy), ("g_kl", g_kl)) if g is not None}
    kept = (kept_logits, kept_ref_logits) if use_kept else None
    with torch.autocast(hidden.device.type, enabled=False):
        out = backward_full(registry.kernels(backend), settings, weight.shape[0], grads, hidden, weight, bias,
                            labels, ref_hidden, ref_weight, ref_bias, lse, entropy, ref_lse, kept, needs_grad)
    return tuple(_empty(hidden) if g is None else g for g in out)


_LIB.impl("token_stats", _op_forward, "CompositeExplicitAutograd")
_LIB.impl("token_stats_backward", _op_backward, "CompositeExplicitAutograd")


@torch.library.register_fake("fastpref::token_stats", lib=_LIB)
def _fake_forward(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, *settings_and_more):
    *encoded, needs_grad, _backend = settings_and_more
    settings = Settings.decode(*encoded)
    has_ref = ref_hidden is not None
    dtype = stat_dtype(hidden.dtype)
    asked = {"logp": True, "entropy": settings.want.entropy, "ref_logp": has_ref,
             "ref_entropy": has_ref and settings.want.ref_entropy, "kl": has_ref and settings.want.kl,
             "log_sum_sq_probs": settings.want.log_sum_sq_probs, "mean_logits": settings.want.mean_logits,
             "is_top1": settings.want.is_top1}
    stats = tuple(labels.new_empty(labels.shape, dtype=torch.bool if k == "is_top1" else dtype) if asked[k]
                  else hidden.new_empty(0) for k in STATS)
    vocab = weight.shape[0]
    frozen = needs_grad == _GRAD_H and len(settings.differentiable()) == 1
    may_keep = needs_grad and not frozen and settings.logits_budget > 0
    kept = torch.library.get_ctx().new_dynamic_size() if may_keep else 0
    kept_ref = kept if has_ref and settings.want.kl else 0
    return stats + (
        labels.new_empty(labels.shape, dtype=dtype),
        labels.new_empty(labels.shape, dtype=dtype) if has_ref else hidden.new_empty(0),
        hidden.new_empty((kept, vocab)),
        hidden.new_empty((kept_ref, vocab)),
        hidden.new_empty(hidden.shape) if frozen else hidden.new_empty(0),
    )


@torch.library.register_fake("fastpref::token_stats_backward", lib=_LIB)
def _fake_backward(g_logp, g_entropy, g_kl, hidden, weight, bias, labels, *rest):
    needs_grad = rest[-2]
    return (
        hidden.new_empty(hidden.shape) if needs_grad & _GRAD_H else hidden.new_empty(0),
        weight.new_empty(weight.shape) if needs_grad & _GRAD_W else weight.new_empty(0),
        bias.new_empty(bias.shape) if bias is not None and needs_grad & _GRAD_B else weight.new_empty(0),
    )


def _saved_for_backward(ctx, inputs: tuple, out: tuple, settings: Settings) -> list[torch.Tensor]:
    """What both autograd paths keep: the inputs, the row statistics, and the kept logits (as an attribute:
    the first backward overwrites them with dz and releases them, a second backward recomputes).
    Returns the statistics that carry no gradient."""
    stats, saved = dict(zip(STATS, out)), dict(zip(SAVED, out[len(STATS):]))
    ctx.save_for_backward(*inputs, saved["lse"], stats["entropy"], saved["ref_lse"], saved["hidden_grad"])
    ctx.kept, ctx.kept_unused = [saved["kept_logits"], saved["kept_ref_logits"]], True
    return [v for k, v in stats.items() if k not in settings.differentiable()]


def _upstream(ctx, g_logp, g_entropy, g_kl) -> dict:
    """The upstream gradients of the differentiable statistics that received one."""
    grads = {"g_logp": g_logp, "g_entropy": g_entropy, "g_kl": g_kl}
    return {f"g_{k}": grads[f"g_{k}"] for k in ctx.settings.differentiable() if grads[f"g_{k}"] is not None}


def _frozen_head_grad(ctx, grads: dict, hidden: torch.Tensor, hidden_grad: torch.Tensor) -> torch.Tensor:
    """The frozen head's hidden-space gradient: the forward's ``dz @ W`` for a unit upstream gradient."""
    (g,) = grads.values()
    return (hidden_grad * (g * ctx.settings.scale).to(hidden_grad.dtype)[..., None]).to(hidden.dtype)


def _take_kept(ctx) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The kept logits and whether this backward may use them (only the first may: it overwrites them)."""
    kept_logits, kept_ref_logits = ctx.kept
    use = ctx.kept_unused
    ctx.kept_unused = False
    ctx.kept = [kept_logits.new_empty((0, kept_logits.shape[1])), kept_ref_logits.new_empty((0, kept_ref_logits.shape[1]))]
    return kept_logits, kept_ref_logits, use


def _setup_context(ctx, inputs, output):
    *encoded, needs_grad, backend = inputs[7:]
    ctx.set_materialize_grads(False)
    ctx.settings, ctx.encoded, ctx.needs_grad, ctx.backend = Settings.decode(*encoded), encoded, needs_grad, backend
    constant = _saved_for_backward(ctx, tuple(inputs[:7]), output, ctx.settings)
    ctx.mark_non_differentiable(*constant, *output[len(STATS):])


def no_second_derivative() -> None:
    """The backward is not itself differentiable: with ``create_graph=True`` (grad mode on inside a backward) a
    gradient penalty would silently get the first-order part only (the frozen head's saved gradient is a
    constant), so it is refused."""
    if torch.is_grad_enabled():
        raise RuntimeError("fastpref.token_stats has no second derivative: backward with create_graph=True "
                           "(double backward, gradient penalties) is not supported")


def _op_autograd(ctx, g_logp, g_entropy, _g_ref_logp, _g_ref_entropy, g_kl, *_rest):
    no_second_derivative()
    (hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, lse, entropy, ref_lse,
     hidden_grad) = ctx.saved_tensors
    grads = _upstream(ctx, g_logp, g_entropy, g_kl)
    no_settings = (None,) * 14  # ref tensors, labels and the scalar arguments get no gradient
    if not grads:
        return (None, None, None) + no_settings
    if hidden_grad.numel():
        return (_frozen_head_grad(ctx, grads, hidden, hidden_grad), None, None) + no_settings
    kept_logits, kept_ref_logits, use_kept = _take_kept(ctx)
    grad_h, grad_w, grad_b = torch.ops.fastpref.token_stats_backward(
        grads.get("g_logp"), grads.get("g_entropy"), grads.get("g_kl"), hidden, weight, bias, labels, ref_hidden,
        ref_weight, ref_bias, lse, entropy, ref_lse, kept_logits, kept_ref_logits, use_kept, *ctx.encoded,
        ctx.needs_grad, ctx.backend,
    )
    n = ctx.needs_grad
    return (grad_h if n & _GRAD_H else None, grad_w if n & _GRAD_W else None,
            grad_b if n & _GRAD_B else None) + no_settings


torch.library.register_autograd("fastpref::token_stats", _op_autograd, setup_context=_setup_context, lib=_LIB)


class _ShardedTokenStats(torch.autograd.Function):
    """The same forward and backward with row kernels that are objects (a vocabulary-parallel shard)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, rows, settings, vocab_size):
        ctx.set_materialize_grads(False)
        needs_grad = sum(bit for bit, need in zip((_GRAD_H, _GRAD_W, _GRAD_B), ctx.needs_input_grad[:3]) if need)
        tensors = (hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias)
        out = forward_full(rows, settings, vocab_size, *tensors, needs_grad)
        ctx.rows, ctx.settings, ctx.vocab_size, ctx.needs_grad = rows, settings, vocab_size, needs_grad
        ctx.mark_non_differentiable(*_saved_for_backward(ctx, tensors, out, settings))
        return out[: len(STATS)]

    @staticmethod
    def backward(ctx, g_logp, g_entropy, _g_ref_logp, _g_ref_entropy, g_kl, *_rest):
        no_second_derivative()
        (hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, lse, entropy, ref_lse,
         hidden_grad) = ctx.saved_tensors
        grads = _upstream(ctx, g_logp, g_entropy, g_kl)
        no_settings = (None,) * 7
        if not grads:
            return (None, None, None) + no_settings
        if hidden_grad.numel():
            return (_frozen_head_grad(ctx, grads, hidden, hidden_grad), None, None) + no_settings
        kept_logits, kept_ref_logits, use_kept = _take_kept(ctx)
        out = backward_full(ctx.rows, ctx.settings, ctx.vocab_size, grads, hidden, weight, bias, labels, ref_hidden,
                            ref_weight, ref_bias, lse, entropy, ref_lse,
                            (kept_logits, kept_ref_logits) if use_kept else None, ctx.needs_grad)
        return out + no_settings


# ---- the public function ----


def reference_head(weight, bias, ref_weight, ref_bias):
    """The reference head's ``(weight, bias)``: without a ``ref_weight``, the policy's head, its bias included."""
    if ref_weight is None:
        return weight, bias if ref_bias is None else ref_bias
    return ref_weight, ref_bias


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
    vocab_parallel=None,
) -> TokenStats:
    r"""Per-token log-probs (and entropies, reference stats, KL) of ``softmax(hidden @ weight.T + bias)``.

    Never materialises the ``[N, V]`` logits: only rows whose label is not ``ignore_index`` go through
    the GEMMs, ``chunk_size`` rows at a time.

    Args:
        hidden: ``[..., d]`` final hidden states, aligned with ``labels`` (position t predicts
            ``labels[t]``; see :func:`fastpref.shift_labels`). fp32, bf16, fp16 or fp64.
        weight: ``[V, d]`` LM-head weight, same dtype and device as ``hidden``.
        labels: ``[...]`` integer targets in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` LM-head bias.
        entropy: also return the policy entropy ``H_t`` (differentiable).
        ref_hidden, ref_weight, ref_bias: a frozen reference head evaluated in the same pass
            (``ref_weight`` defaults to ``weight``, and then ``ref_bias`` to ``bias``: the policy's head);
            gives ``ref_logp``. Never receives gradients.
        kl: return ``KL(p_ref,t || p_t)`` per token (needs the reference; differentiable w.r.t. the policy).
        ref_entropy: return the reference entropy (no gradient).
        detach_entropy: with ``entropy=True``, return it without gradient (for metrics; with a frozen head this
            saves one GEMM).
        log_sum_sq_probs, mean_logits, is_top1: no-grad extras (WPO weights and TRL's metrics).
        logits_budget: bytes of chunk logits the backward may keep instead of recomputing them
            (0 = always recompute: 4 GEMMs; enough for all chunks: 3 GEMMs).
        chunk_size: rows per chunk (default: the backend's policy, :class:`fastpref.ops.backend.Backend`:
            256 MiB of fp32 logits with the C++ backend, 128 MiB with the PyTorch one, 512 MiB in the
            input dtype with Triton); the backward tiles hold about as many logits.
        logit_scale, softcap, temperature: the softmax sees
            ``softcap * tanh(logit_scale * (h W^T + b) / softcap) / temperature`` (no tanh when
            ``softcap`` is None), the conventions of Gemma-style heads and TRL's fused head.
        backend: ``"torch"``, ``"triton"``, ``"cpp"`` or another registered name (default: by device,
            or the ``FASTPREF_BACKEND`` environment variable; see :func:`fastpref.backends`).
        vocab_parallel: a :class:`fastpref.ops.vocab_parallel.VocabParallel` when ``weight`` is this
            rank's shard of a vocabulary-parallel head (labels are then global token ids).

    Under ``torch.autocast`` the head runs in the autocast dtype, as ``F.linear`` would (fp64 tensors are
    not cast, so a mix of fp64 and other dtypes is refused); the statistics are fp32 either way (fp64 for
    fp64 inputs). Returns :class:`TokenStats` shaped like ``labels``, zero at
    ignored positions. Host synchronisations: one read of the valid-token count (with the label check)
    and one finiteness check of the rows' log-sum-exps (a NaN or Inf in any input the valid rows use
    is a ``ValueError`` naming it).
    """
    for name, x in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        _checks.tensor(name, x)
    device = hidden.device
    if torch.is_autocast_enabled(device.type):  # as F.linear under autocast: the head runs in its dtype
        dtype = torch.get_autocast_dtype(device.type)
        # autocast casts floating tensors other than fp64 (fp64 math is kept; a mix is then refused below)
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias = (
            x.to(dtype) if x is not None and x.is_floating_point() and x.dtype != torch.float64 else x
            for x in (hidden, weight, bias, ref_hidden, ref_weight, ref_bias))
    if ref_hidden is not None:
        ref_weight, ref_bias = reference_head(weight, bias, ref_weight, ref_bias)
    full_vocab = _checks.check_token_inputs(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, ref_hidden=ref_hidden,
        ref_weight=ref_weight, ref_bias=ref_bias, kl=kl, ref_entropy=ref_entropy, logits_budget=logits_budget,
        chunk_size=chunk_size, logit_scale=logit_scale, softcap=softcap, temperature=temperature,
        vocab_size=None if vocab_parallel is None else vocab_parallel.vocab_size,
        flags=dict(entropy=entropy, kl=kl, ref_entropy=ref_entropy, detach_entropy=detach_entropy,
                   log_sum_sq_probs=log_sum_sq_probs, mean_logits=mean_logits, is_top1=is_top1),
    )
    chosen = registry.resolve(device, backend if vocab_parallel is None else backend or vocab_parallel.backend,
                              hidden.dtype)
    if softcap:
        scale, post_scale = float(logit_scale), 1.0 / temperature
    else:
        scale, post_scale = float(logit_scale) / temperature, 1.0
    settings = Settings(
        want=Want(bool(entropy), bool(log_sum_sq_probs), bool(mean_logits), bool(is_top1), bool(ref_entropy), bool(kl)),
        detach_entropy=bool(detach_entropy), ignore_index=int(ignore_index),
        # From the full vocabulary: the ranks of a vocabulary-parallel head must agree on the chunks.
        chunk_rows=chunk_size or chosen.chunk_rows(full_vocab, hidden.element_size()),
        logits_budget=int(logits_budget), scale=scale, softcap=float(softcap or 0.0), post_scale=post_scale,
    )
    if ref_hidden is not None:
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
        ref_bias = None if ref_bias is None else ref_bias.detach()
    if vocab_parallel is None:
        grad = torch.is_grad_enabled()
        needs_grad = sum(bit for bit, x in ((_GRAD_H, hidden), (_GRAD_W, weight), (_GRAD_B, bias))
                         if grad and x is not None and x.requires_grad)
        out = torch.ops.fastpref.token_stats(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias,
                                             *settings.encode(), needs_grad, chosen.name)
    else:
        vocab_parallel.check_shard(weight)
        rows = vocab_parallel.kernels(registry.kernels(chosen.name))
        out = _ShardedTokenStats.apply(vocab_parallel.hidden(hidden), weight, bias, labels, ref_hidden, ref_weight,
                                       ref_bias, rows, settings, full_vocab)
    asked = {"logp": True, "entropy": entropy, "ref_logp": ref_hidden is not None, "ref_entropy": ref_entropy,
             "kl": kl, "log_sum_sq_probs": log_sum_sq_probs, "mean_logits": mean_logits, "is_top1": is_top1}
    return TokenStats(**{k: v if asked[k] else None for k, v in zip(STATS, out)})


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``labels[..., 1:]`` padded with ``ignore_index``: aligns HF-style labels with unshifted hidden states."""
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


__all__ = ["Settings", "TokenStats", "backward_full", "forward_full", "shift_labels", "stat_dtype", "token_stats"]
