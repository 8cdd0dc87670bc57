"""Row kernels of the token-statistics op in plain PyTorch: the portable backend, and the reference.

Implements :class:`fastpref.ops.backend.RowKernels` on any device. It allocates fp32 temporaries of
the chunk's size (up to three for bf16/fp16 inputs with entropies, about five with the reference and
KL), which the Triton and C++ backends avoid. fp64 logits are computed in fp64.
"""

from __future__ import annotations

import torch

from .backend import Want


def transform_logits(raw: torch.Tensor, softcap: float, post_scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits ``z`` seen by the softmax (fp32, or fp64 for fp64 input), and ``tanh(raw / softcap)``
    when soft-capping (for the backward).

    A logit of -inf (a vocabulary row masked by a -inf bias) has p = 0: it becomes the dtype's most negative
    finite value, in place, so that ``p log p`` and ``p_ref (z_ref - z)`` are 0, not ``0 * inf = NaN``
    (clamping keeps a NaN, and +inf is left for the log-sum-exp check)."""
    z = raw.to(torch.promote_types(raw.dtype, torch.float32))
    z.clamp_(min=torch.finfo(z.dtype).min)
    if not softcap:
        return z, None
    t = torch.tanh(z / softcap)
    return t * (softcap * post_scale), t


def forward_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    want: Want,
    ref_logits: torch.Tensor | None = None,
    softcap: float = 0.0,
    post_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    z, _ = transform_logits(logits, softcap, post_scale)
    lse = torch.logsumexp(z, dim=-1)
    out = {"lse": lse, "logp": z.gather(1, target[:, None]).squeeze(1) - lse}
    if want.entropy or want.log_sum_sq_probs:
        logq = z - lse[:, None]
        p = torch.exp(logq)
        if want.entropy:  # -sum p log p, not lse - sum p z: no cancellation when |z| >> H
            out["entropy"] = -torch.linalg.vecdot(p, logq)
        if want.log_sum_sq_probs:
            out["log_sum_sq_probs"] = torch.log(torch.linalg.vecdot(p, p))
        del p, logq
    if want.mean_logits:
        out["mean_logits"] = z.mean(dim=-1)
    if want.is_top1:
        out["is_top1"] = z.argmax(dim=-1) == target  # argmax takes the first maximum, as TRL does
    if ref_logits is None:
        return out

    zr, _ = transform_logits(ref_logits, softcap, post_scale)
    ref_lse = torch.logsumexp(zr, dim=-1)
    out["ref_lse"] = ref_lse
    out["ref_logp"] = zr.gather(1, target[:, None]).squeeze(1) - ref_lse
    if want.ref_entropy or want.kl:
        logr = zr - ref_lse[:, None]
        pr = torch.exp(logr)
        if want.ref_entropy:
            out["ref_entropy"] = -torch.linalg.vecdot(pr, logr)
        if want.kl:
            # KL(p_ref || p) = sum p_ref (z_ref - z) + lse - lse_ref; the difference z_ref - z is taken first
            # so that nearly equal distributions do not cancel two large sums.
            out["kl"] = torch.linalg.vecdot(pr, zr - z) + lse - ref_lse
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
    # dL/dz = p * (a + b log p) - g_kl p_ref + g_logp onehot, with
    #   a = -g_logp + g_kl - g_entropy H,  b = -g_entropy      (entropy term: -g p (log p + H))
    z, t = transform_logits(logits, softcap, post_scale)
    a = torch.zeros(logits.shape[0], device=logits.device, dtype=z.dtype)
    if g_logp is not None:
        a -= g_logp
    if g_kl is not None:
        a += g_kl
    logq = z.sub_(lse[:, None])  # in place: z is fp32 and ours (a copy, or the logits themselves)
    if g_entropy is not None:
        a -= g_entropy * entropy
        p = torch.exp(logq)
        logq.mul_(-g_entropy[:, None]).add_(a[:, None]).mul_(p)
        del p
    else:
        logq.exp_().mul_(a[:, None])
    dz = logq  # from here on, the buffer holds the gradient
    if g_kl is not None:
        pr, _ = transform_logits(ref_logits, softcap, post_scale)
        pr.sub_(ref_lse[:, None]).exp_()
        dz.addcmul_(pr, g_kl[:, None], value=-1.0)
        del pr
    if g_logp is not None:  # a target outside this (vocabulary-slice) tile has no one-hot term here
        inside = (target >= 0) & (target < dz.shape[1])
        dz.scatter_add_(1, target.clamp(0, dz.shape[1] - 1)[:, None], torch.where(inside, g_logp, 0.0)[:, None])
    if t is not None:
        dz.mul_(t.square_().neg_().add_(1.0).mul_(post_scale))
    if dz is not logits:
        logits.copy_(dz)
