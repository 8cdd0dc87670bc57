"""Token-level DPO (TDPO1/2; Zeng et al., ICML 2024): DPO with the sequential KL against the reference.

Needs the per-token ``KL(p_ref,t || p_t)`` over the full vocabulary, so the fused front door runs the
reference head in the same pass (``ref_hidden``); the KL's gradient flows to the policy only. The
summed KL of a response is ``D(y) = sum_t KL_t`` (``SequenceStats.sum_kl``). With per-token weights
on the log-ratio and KL sums (``logp_weights`` / ``kl_weights``, see :func:`fastpref.reduce_tokens`)
TDPO1 is SparsePO's objective (without its L1 penalty on the masks, which the caller owns).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks
from ._common import check_pair, detached, reduce
from .checks import check_non_negative, check_positive, check_used
from .registry import LossResult, PairBatch, register


def tdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_kl: torch.Tensor,
    rejected_kl: torch.Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 0.5,
    tdpo2: bool = True,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""TDPO: ``-log sigma(beta * logits)`` with the sequential KL ``D(y) = sum_t KL(p_ref,t || p_t)``::

        TDPO1:  logits = (rho_w - rho_l) - (D_l - D_w)
        TDPO2:  logits = (rho_w - rho_l) - alpha (D_l - sg(D_w))        (default)

    with ``rho = log pi(y) - log pi_ref(y)`` from SUMMED log-probs. Defaults ``beta = 0.1``,
    ``alpha = 0.5`` and ``tdpo2=True`` are the official function's and README's (the repository's
    yaml selects TDPO1). With ``chosen_kl = rejected_kl = 0`` both are DPO.

    Returns ``(losses, chosen_rewards, rejected_rewards)``, rewards ``beta * (rho + D)`` as the TDPO
    code logs them (the KL is added), detached.
    """
    check_pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, reference="required")
    _checks.per_example("chosen_kl", chosen_kl, policy_chosen_logps)
    _checks.per_example("rejected_kl", rejected_kl, policy_chosen_logps)
    check_positive("beta", beta, like=policy_chosen_logps)
    check_non_negative("alpha", alpha, like=policy_chosen_logps)
    tdpo2 = _checks.flag("tdpo2", tdpo2)
    check_used("alpha", alpha, 0.5, used=tdpo2, only="by TDPO2 (tdpo2=True)")
    chosen_lr = policy_chosen_logps - ref_chosen_logps
    rejected_lr = policy_rejected_logps - ref_rejected_logps
    if tdpo2:
        kl_term = alpha * (rejected_kl - chosen_kl.detach())
    else:
        kl_term = rejected_kl - chosen_kl
    losses = -F.logsigmoid(beta * (chosen_lr - rejected_lr - kl_term))
    return (reduce(losses, reduction), *detached(beta * (chosen_lr + chosen_kl), beta * (rejected_lr + rejected_kl)))


def tdpo1_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_kl: torch.Tensor,
    rejected_kl: torch.Tensor,
    *,
    beta: float = 0.1,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""TDPO1, ``-log sigma(beta ((rho_w - rho_l) - (D_l - D_w)))``: :func:`tdpo_loss` with ``tdpo2=False``."""
    return tdpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_kl,
                     rejected_kl, beta=beta, tdpo2=False, reduction=reduction)


def tdpo2_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_kl: torch.Tensor,
    rejected_kl: torch.Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 0.5,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""TDPO2: ``-log sigma(beta ((rho_w - rho_l) - alpha (D_l - sg(D_w))))`` (:func:`tdpo_loss`, the default)."""
    return tdpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_kl,
                     rejected_kl, beta=beta, alpha=alpha, tdpo2=True, reduction=reduction)


# ---- fused front-door adapters (see fastpref.losses.registry) ----


def _tdpo_from_batch(batch: PairBatch, function, **hparams) -> LossResult:
    """Summed (or token-weighted) log-ratios and KL sums into :func:`tdpo_loss`, plus TDPO's KL metrics."""
    chosen, rejected = batch.chosen, batch.rejected
    if chosen.weighted_sum_logp is not None:  # SparsePO-style weights on both the policy and the reference
        logps = (chosen.weighted_sum_logp, rejected.weighted_sum_logp,
                 chosen.ref_weighted_sum_logp, rejected.ref_weighted_sum_logp)
    else:
        logps = batch.inputs(mean=False)
    if chosen.weighted_sum_kl is not None:
        kl_w, kl_l = chosen.weighted_sum_kl, rejected.weighted_sum_kl
    else:
        kl_w, kl_l = chosen.sum_kl, rejected.sum_kl
    out = function(*logps, kl_w, kl_l, reduction="none", **hparams)
    kl_w, kl_l = detached(kl_w, kl_l)
    metrics = {"kl/chosen": kl_w.mean(), "kl/rejected": kl_l.mean(), "kl/margin": (kl_w - kl_l).mean()}
    return LossResult(*out, metrics)


@register("tdpo1", function=tdpo1_loss, reference="required", kl=True, token_weights=True)
def _tdpo1_from_batch(batch: PairBatch, **hparams) -> LossResult:
    """TDPO1: DPO margin minus the sequential-KL difference D_l - D_w (with token weights: SparsePO)."""
    return _tdpo_from_batch(batch, tdpo1_loss, **hparams)


@register("tdpo2", function=tdpo2_loss, reference="required", kl=True, token_weights=True)
def _tdpo2_from_batch(batch: PairBatch, **hparams) -> LossResult:
    """TDPO2: DPO margin minus alpha (D_l - sg(D_w)); the official default."""
    return _tdpo_from_batch(batch, tdpo2_loss, **hparams)
