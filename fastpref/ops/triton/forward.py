"""Forward row kernel: every per-token statistic of one chunk of logits in a single read of each row."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import LOG2E, above_minus_inf, tanh

# Initial running maximum: finite, so that the first rescale factor exp2((m_old - m_new) * LOG2E) is 0
# and (m_old - m_new) * sum_exp is 0 * finite = 0 rather than -inf * 0 = NaN.
_NO_MAX = tl.constexpr(-1.0e30)


@triton.jit
def token_stats_forward_kernel(
    logits_ptr,
    logits_stride,
    ref_ptr,
    ref_stride,
    target_ptr,
    lse_ptr,
    logp_ptr,
    entropy_ptr,
    log_sum_sq_ptr,
    mean_ptr,
    top1_ptr,
    ref_lse_ptr,
    ref_logp_ptr,
    ref_entropy_ptr,
    kl_ptr,
    vocab,
    softcap,
    post_scale,
    HAS_REF: tl.constexpr,
    ENTROPY: tl.constexpr,
    LOG_SUM_SQ: tl.constexpr,
    MEAN: tl.constexpr,
    TOP1: tl.constexpr,
    REF_ENTROPY: tl.constexpr,
    KL: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per row: an online (max, sum-exp) pass over the vocabulary in blocks of BLOCK.

    With the running max ``m`` (in logit units) and ``e_v = exp(z_v - m)`` (one exp2 per element, the
    log2(e) factor folded into its argument), the accumulators are
    ``s = sum e``, ``a = sum e (z - m)`` (entropy: H = log s - a / s, shifted by ``m`` so that large
    logits do not cancel), ``q = sum e^2`` (log sum p^2 = log q - 2 log s), ``sum z`` and the first
    argmax. The reference row gets its own ``m_r, s_r, a_r`` plus ``k = sum e_r (z_r - z)``, so that
    KL(p_ref || p) = k / s_r + lse - lse_ref needs no second pass. Every accumulator is rescaled when
    its running max grows.
    """
    row = tl.program_id(0).to(tl.int64)  # row * stride can exceed 2**31
    z_row = logits_ptr + row * logits_stride
    zr_row = ref_ptr + row * ref_stride
    cols = tl.arange(0, BLOCK)

    m = _NO_MAX
    s = 0.0
    a = 0.0
    q = 0.0
    z_sum = 0.0
    arg = 0
    m_r = _NO_MAX
    s_r = 0.0
    a_r = 0.0
    k = 0.0
    for start in range(0, vocab, BLOCK):
        offs = start + cols
        mask = offs < vocab
        # Masked lanes load 0, which the soft-cap keeps at 0: finite in every product and sum below;
        # only the max and the exponent see them as -inf (so that e = 0 there).
        z = above_minus_inf(tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32))
        if SOFTCAP:
            z = (post_scale * softcap) * tanh(z / softcap)
        z_live = tl.where(mask, z, -float("inf"))
        block_max = tl.max(z_live, axis=0)
        if TOP1:
            # Strictly greater: on a tie the earlier block keeps the argmax, as torch.argmax does.
            block_arg = tl.min(tl.where(z_live == block_max, offs, vocab), axis=0)
            arg = tl.where(block_max > m, block_arg, arg)
        m_new = tl.maximum(m, block_max)
        alpha = tl.exp2((m - m_new) * LOG2E)
        e = tl.exp2((z_live - m_new) * LOG2E)
        if ENTROPY:
            a = alpha * (a + (m - m_new) * s) + tl.sum(e * (z - m_new), axis=0)
        if LOG_SUM_SQ:
            q = alpha * alpha * q + tl.sum(e * e, axis=0)
        if MEAN:
            z_sum += tl.sum(z, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new

        if HAS_REF:
            zr = above_minus_inf(tl.load(zr_row + offs, mask=mask, other=0.0).to(tl.float32))
            if SOFTCAP:
                zr = (post_scale * softcap) * tanh(zr / softcap)
            zr_live = tl.where(mask, zr, -float("inf"))
            mr_new = tl.maximum(m_r, tl.max(zr_live, axis=0))
            alpha_r = tl.exp2((m_r - mr_new) * LOG2E)
            e_r = tl.exp2((zr_live - mr_new) * LOG2E)
            if REF_ENTROPY:
                a_r = alpha_r * (a_r + (m_r - mr_new) * s_r) + tl.sum(e_r * (zr - mr_new), axis=0)
            if KL:
                # z_ref - z is taken per element, so nearly equal distributions do not cancel two large sums.
                k = alpha_r * k + tl.sum(e_r * (zr - z), axis=0)
            s_r = alpha_r * s_r + tl.sum(e_r, axis=0)
            m_r = mr_new

    target = tl.load(target_ptr + row)
    z_y = above_minus_inf(tl.load(z_row + target).to(tl.float32))
    if SOFTCAP:
        z_y = (post_scale * softcap) * tanh(z_y / softcap)
    log_s = tl.log(s)
    lse = m + log_s
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, z_y - lse)
    if ENTROPY:
        tl.store(entropy_ptr + row, log_s - a / s)
    if LOG_SUM_SQ:
        tl.store(log_sum_sq_ptr + row, tl.log(q) - 2.0 * log_s)
    if MEAN:
        tl.store(mean_ptr + row, z_sum / vocab)
    if TOP1:
        tl.store(top1_ptr + row, arg == target)

    if HAS_REF:
        zr_y = above_minus_inf(tl.load(zr_row + target).to(tl.float32))
        if SOFTCAP:
            zr_y = (post_scale * softcap) * tanh(zr_y / softcap)
        log_s_r = tl.log(s_r)
        ref_lse = m_r + log_s_r
        tl.store(ref_lse_ptr + row, ref_lse)
        tl.store(ref_logp_ptr + row, zr_y - ref_lse)
        if REF_ENTROPY:
            tl.store(ref_entropy_ptr + row, log_s_r - a_r / s_r)
        if KL:
            tl.store(kl_ptr + row, k / s_r + lse - ref_lse)
