"""Backward row kernel: overwrites a chunk of logits with dL/d(logits), one block of one row per program."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import LOG2E, above_minus_inf, tanh


@triton.jit
def token_stats_backward_kernel(
    logits_ptr,
    logits_stride,
    ref_ptr,
    ref_stride,
    target_ptr,
    lse_ptr,
    g_logp_ptr,
    g_entropy_ptr,
    entropy_ptr,
    g_kl_ptr,
    ref_lse_ptr,
    vocab,
    softcap,
    post_scale,
    HAS_LOGP: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_KL: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``dz = g_logp (onehot - p) - g_entropy p (log p + H) + g_kl (p - p_ref)``, times the soft-cap derivative.

    Grid ``(rows, cdiv(vocab, BLOCK))``: every block is independent given the per-row lse (and H,
    lse_ref), so no program loops. All math is fp32 and the result is rounded once, on the store; in
    particular the target's ``1 - p_y`` is formed in fp32, not from a rounded ``p_y``.
    """
    row = tl.program_id(0).to(tl.int64)  # row * stride can exceed 2**31
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < vocab
    ptrs = logits_ptr + row * logits_stride + offs
    z = above_minus_inf(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32))
    if SOFTCAP:
        t = tanh(z / softcap)
        z = (post_scale * softcap) * t
    log_p = z - tl.load(lse_ptr + row)
    p = tl.exp2(log_p * LOG2E)

    grad = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_LOGP:
        onehot = tl.where(offs == tl.load(target_ptr + row), 1.0, 0.0)
        grad += tl.load(g_logp_ptr + row) * (onehot - p)
    if HAS_ENTROPY:
        grad -= tl.load(g_entropy_ptr + row) * p * (log_p + tl.load(entropy_ptr + row))
    if HAS_KL:
        zr = above_minus_inf(tl.load(ref_ptr + row * ref_stride + offs, mask=mask, other=0.0).to(tl.float32))
        if SOFTCAP:
            zr = (post_scale * softcap) * tanh(zr / softcap)
        p_ref = tl.exp2((zr - tl.load(ref_lse_ptr + row)) * LOG2E)
        grad += tl.load(g_kl_ptr + row) * (p - p_ref)
    if SOFTCAP:
        grad *= post_scale * (1.0 - t * t)
    tl.store(ptrs, grad.to(logits_ptr.dtype.element_ty), mask=mask)
