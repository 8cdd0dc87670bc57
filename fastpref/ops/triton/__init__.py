"""Triton row kernels: the CUDA backend of the token-statistics op.

Implements :class:`fastpref.ops.backend.RowKernels` (same signatures, keys and semantics as
:mod:`fastpref.ops.rows_torch`) with one fused kernel per direction; the chunk GEMMs stay on cuBLAS
in :mod:`fastpref.ops.token_stats`. Runs on CUDA tensors, or on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1`` set before this package is imported).

Launch heuristic (no autotuning: it would benchmark the in-place backward on live data, and the
interpreter needs a single config anyway). Both kernels stream the chunk through registers once, so
they are bound by HBM bandwidth on Ampere and Hopper alike; what matters is enough bytes in flight per
SM and no register spills. ``BLOCK = min(4096, next_pow2(V))`` columns over 8 warps gives each thread 16
contiguous elements (two 16-byte loads in bf16 when rows are 16-byte aligned); compiled for sm_80 and
sm_90 this needs at most 128 registers per thread with every statistic on, and no spills. Smaller
vocabularies scale the warps down with the block. The forward runs one program per row (a chunk of a
few hundred rows keeps every SM busy); the backward one program per (row, block), so it fills the GPU
at any chunk size.
"""

from __future__ import annotations

import os

import torch

from ..backend import Want

try:
    import triton
except ImportError:  # the registry reads AVAILABLE and then never calls into this module
    AVAILABLE = False
else:
    AVAILABLE = True
    from .backward import token_stats_backward_kernel
    from .forward import token_stats_forward_kernel

MAX_BLOCK = 4096
# Tuning knobs for a GPU session (benchmarks/gpu_check.py --tune): override the launch heuristic.
BLOCK_ENV, WARPS_ENV = "FASTPREF_TRITON_BLOCK", "FASTPREF_TRITON_WARPS"


def _env_power_of_two(name: str, default: int, upper: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    value = int(raw) if raw.isdigit() else 0
    if value < 1 or value > upper or value & (value - 1):
        raise ValueError(f"fastpref: `{name}` must be a power of two in [1, {upper}], got {raw!r}")
    return value


def launch_config(vocab: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` of both kernels for rows of ``vocab`` columns (see the module docstring),
    unless ``FASTPREF_TRITON_BLOCK`` / ``FASTPREF_TRITON_WARPS`` say otherwise (read at every launch)."""
    block = min(MAX_BLOCK, triton.next_power_of_2(vocab))
    warps = max(1, min(8, block // 512))
    return _env_power_of_two(BLOCK_ENV, block, 2**16), _env_power_of_two(WARPS_ENV, warps, 32)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """The kernels index rows by stride and columns contiguously."""
    return x if x.stride(-1) == 1 else x.contiguous()


def forward_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    want: Want,
    ref_logits: torch.Tensor | None = None,
    softcap: float = 0.0,
    post_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    rows, vocab = logits.shape
    logits = _unit_stride(logits)
    target = target.contiguous()
    has_ref = ref_logits is not None
    ref = _unit_stride(ref_logits) if has_ref else logits

    def new(dtype=torch.float32):
        return torch.empty(rows, device=logits.device, dtype=dtype)

    out = {"lse": new(), "logp": new()}
    if want.entropy:
        out["entropy"] = new()
    if want.log_sum_sq_probs:
        out["log_sum_sq_probs"] = new()
    if want.mean_logits:
        out["mean_logits"] = new()
    if want.is_top1:
        out["is_top1"] = new(torch.bool)
    if has_ref:
        out["ref_lse"], out["ref_logp"] = new(), new()
        if want.ref_entropy:
            out["ref_entropy"] = new()
        if want.kl:
            out["kl"] = new()
    if rows == 0:
        return out

    # Outputs that were not asked for are never written (their flag is off): any pointer will do.
    unused = out["lse"]
    block, num_warps = launch_config(vocab)
    token_stats_forward_kernel[(rows,)](
        logits,
        logits.stride(0),
        ref,
        ref.stride(0),
        target,
        out["lse"],
        out["logp"],
        out.get("entropy", unused),
        out.get("log_sum_sq_probs", unused),
        out.get("mean_logits", unused),
        out.get("is_top1", unused),
        out.get("ref_lse", unused),
        out.get("ref_logp", unused),
        out.get("ref_entropy", unused),
        out.get("kl", unused),
        vocab,
        float(softcap or 1.0),
        float(post_scale),
        HAS_REF=has_ref,
        ENTROPY=want.entropy,
        LOG_SUM_SQ=want.log_sum_sq_probs,
        MEAN=want.mean_logits,
        TOP1=want.is_top1,
        REF_ENTROPY=has_ref and want.ref_entropy,
        KL=has_ref and want.kl,
        SOFTCAP=bool(softcap),
        BLOCK=block,
        num_warps=num_warps,
    )
    return out


def backward_rows_(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    *,
    g_logp: torch.Tensor | None = None,
    g_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    g_kl: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    ref_lse: torch.Tensor | None = None,
    softcap: float = 0.0,
    post_scale: float = 1.0,
) -> None:
    rows, vocab = logits.shape
    if rows == 0:
        return
    if logits.stride(-1) != 1:  # the kernel works in place: go through a contiguous copy
        dz = logits.contiguous()
        backward_rows_(
            dz, target, lse, g_logp=g_logp, g_entropy=g_entropy, entropy=entropy, g_kl=g_kl,
            ref_logits=ref_logits, ref_lse=ref_lse, softcap=softcap, post_scale=post_scale,
        )
        logits.copy_(dz)
        return
    has_kl = g_kl is not None
    ref = _unit_stride(ref_logits) if has_kl else logits

    def row_vector(x: torch.Tensor | None) -> torch.Tensor:
        # Absent coefficients are never read (their flag is off): any fp32 pointer will do.
        return lse.contiguous() if x is None else x.float().contiguous()

    block, num_warps = launch_config(vocab)
    token_stats_backward_kernel[(rows, triton.cdiv(vocab, block))](
        logits,
        logits.stride(0),
        ref,
        ref.stride(0),
        target.contiguous(),
        lse.contiguous(),
        row_vector(g_logp),
        row_vector(g_entropy),
        row_vector(entropy if g_entropy is not None else None),
        row_vector(g_kl),
        row_vector(ref_lse if has_kl else None),
        vocab,
        float(softcap or 1.0),
        float(post_scale),
        HAS_LOGP=g_logp is not None,
        HAS_ENTROPY=g_entropy is not None,
        HAS_KL=has_kl,
        SOFTCAP=bool(softcap),
        BLOCK=block,
        num_warps=num_warps,
    )


__all__ = ["AVAILABLE", "backward_rows_", "forward_rows", "launch_config"]
