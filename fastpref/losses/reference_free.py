"""Pairwise losses without a reference model: SimPO, CPO (+AlphaPO), ORPO.

Same return convention as :mod:`fastpref.losses.pairwise`. The NLL term of CPO / ORPO / SimPO's
optional SFT term is the token-mean cross-entropy of the chosen responses over the whole batch
(``policy_nll_loss``, a scalar); the fused front door computes it (on ``labels``, or on its own
``nll_labels``), a caller of these functions passes it. Its weight switches it off explicitly
(``cpo_alpha=0``, ``nll_weight=0``, SimPO's default ``sft_weight=0``); a nonzero weight without
``policy_nll_loss`` is an error, not a silently dropped term. It is added to every per-pair loss, so
the mean over pairs equals TRL's ``losses.mean() + alpha * nll``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_label_smoothing, check_pair, detached, reduce, smoothed_logistic, with_nll
from .checks import check_choice, check_non_negative, check_number, check_positive, check_used
from .registry import LossResult, PairBatch, hyperparameter, register

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
SIMPO_LOSS_TYPES = ("sigmoid", "hinge")


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.25,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    sft_weight: float = 0.0,
    policy_nll_loss: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""SimPO: ``-log sigma(beta (A_w - A_l) - gamma)`` on MEAN log-probs ``A``, ``gamma = beta * gamma_beta_ratio``.

    ``loss_type="hinge"`` gives ``relu(1 - beta (A_w - A_l - gamma/beta))``. Defaults (``beta=2.0``,
    ``gamma_beta_ratio=0.25``) are the official repository's; ``sft_weight > 0`` adds
    ``sft_weight * policy_nll_loss`` (then required). Rewards are ``beta * A``.
    """
    check_pair(policy_chosen_logps, policy_rejected_logps, reference="none")
    check_positive("beta", beta, like=policy_chosen_logps)
    check_non_negative("gamma_beta_ratio", gamma_beta_ratio, like=policy_chosen_logps)
    check_choice("loss_type", loss_type, SIMPO_LOSS_TYPES)
    check_label_smoothing(label_smoothing, loss_types=[loss_type], smoothed=("sigmoid",))
    check_non_negative("sft_weight", sft_weight, scalar=True)
    logits = policy_chosen_logps - policy_rejected_logps - gamma_beta_ratio
    if loss_type == "sigmoid":
        losses = smoothed_logistic(beta * logits, label_smoothing)
    else:
        losses = torch.relu(1 - beta * logits)
    losses = with_nll(losses, "sft_weight", sft_weight, policy_nll_loss)
    return (reduce(losses, reduction), *detached(beta * policy_chosen_logps, beta * policy_rejected_logps))


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    cpo_alpha: float = 1.0,
    policy_nll_loss: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Contrastive Preference Optimisation (TRL's ``CPOTrainer``): ``-log sigma(beta (r_w - r_l)) + cpo_alpha * NLL``.

    ``r`` is the log-prob (summed for ``sigmoid``/``hinge``, mean for ``ipo``/``simpo``: pass what the
    loss type expects), or AlphaPO's ``(1 - p^{-alpha}) / alpha`` with ``p = exp(logp)`` when
    ``alpha != 0``. ``loss_type``: ``sigmoid`` (+``label_smoothing``), ``hinge``, ``ipo``
    (``(r_w - r_l - 1/(2 beta))^2``) or ``simpo`` (margin ``simpo_gamma / beta``). ``policy_nll_loss``
    is required unless ``cpo_alpha=0`` (the preference term alone).
    """
    check_pair(policy_chosen_logps, policy_rejected_logps, reference="none")
    check_positive("beta", beta, like=policy_chosen_logps)
    check_choice("loss_type", loss_type, CPO_LOSS_TYPES)
    check_label_smoothing(label_smoothing, loss_types=[loss_type], smoothed=("sigmoid", "simpo"))
    check_non_negative("simpo_gamma", simpo_gamma, like=policy_chosen_logps)
    check_used("simpo_gamma", simpo_gamma, 0.5, used=loss_type == "simpo", only="by loss_type 'simpo'")
    check_number("alpha", alpha, scalar=True)
    check_non_negative("cpo_alpha", cpo_alpha, scalar=True)
    dtype = policy_chosen_logps.dtype
    if alpha:
        # (1 - p^-alpha) / alpha with p^-alpha = exp(-alpha logp), in fp64: forming p underflows to 0 below a
        # log-prob of ~-103 in fp32 (0^-alpha = inf, a NaN loss), and exp(-alpha logp) overflows fp32 once
        # alpha |logp| > 88 (fp64: 709); expm1 is exact near 0. The loss and rewards return in the input dtype.
        chosen_r = -torch.expm1(-alpha * policy_chosen_logps.double()) / alpha
        rejected_r = -torch.expm1(-alpha * policy_rejected_logps.double()) / alpha
    else:
        chosen_r, rejected_r = policy_chosen_logps, policy_rejected_logps
    logits = chosen_r - rejected_r
    if loss_type == "simpo":
        losses = smoothed_logistic(beta * (logits - simpo_gamma / beta), label_smoothing)
    elif loss_type == "sigmoid":
        losses = smoothed_logistic(beta * logits, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    losses = with_nll(losses, "cpo_alpha", cpo_alpha, policy_nll_loss).to(dtype)
    return (reduce(losses, reduction), *detached((beta * chosen_r).to(dtype), (beta * rejected_r).to(dtype)))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - e^x)`` for ``x < 0``, switching formulas at ``-log 2`` to avoid cancellation.

    Each branch sees its input clamped to its own side, so the unused branch never makes a NaN gradient.
    """
    split = -0.6931471805599453
    near_zero = torch.log(-torch.expm1(x.clamp(min=split)))
    far = torch.log1p(-torch.exp(x.clamp(max=split)))
    return torch.where(x > split, near_zero, far)


def orpo_log_odds(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor) -> torch.Tensor:
    """``log odds(y_w) - log odds(y_l)`` with ``odds = p / (1 - p)``, ``p = exp(mean logp)``, in >= fp32."""
    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    w, l = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    return (w - l) - (log1mexp(w) - log1mexp(l))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    nll_weight: float = 1.0,
    policy_nll_loss: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Odds-Ratio Preference Optimisation: ``nll_weight * NLL_w - beta * log sigma(log_odds)`` on MEAN log-probs.

    ``log_odds`` is :func:`orpo_log_odds` (``beta`` is the paper's lambda, default 0.1). ORPO is
    ``nll_weight=1`` (TRL's ``ORPOTrainer``), which needs ``policy_nll_loss``; ``nll_weight=0`` is the
    odds-ratio term alone (Liger's ``compute_nll_loss=False``). Rewards are ``beta * A``. TRL logs
    ``log_odds_ratio = mean log sigma(log_odds)`` and ``log_odds_chosen = mean log_odds``.
    """
    check_pair(policy_chosen_logps, policy_rejected_logps, reference="none")
    check_positive("beta", beta, like=policy_chosen_logps)
    check_non_negative("nll_weight", nll_weight, scalar=True)
    losses = -beta * F.logsigmoid(orpo_log_odds(policy_chosen_logps, policy_rejected_logps))
    losses = with_nll(losses, "nll_weight", nll_weight, policy_nll_loss)
    return (reduce(losses, reduction), *detached(beta * policy_chosen_logps, beta * policy_rejected_logps))


# ---- fused front-door adapters (see fastpref.losses.registry) ----


@register("simpo", function=simpo_loss, provided=("policy_nll_loss",), nll_weight="sft_weight")
def _simpo_from_batch(batch: PairBatch, **hparams) -> LossResult:
    """SimPO: length-normalised, reference-free, with a target margin gamma."""
    nll = batch.chosen_nll if hyperparameter(simpo_loss, "sft_weight", hparams) else None
    losses, cr, rr = simpo_loss(*batch.logps(mean=True), policy_nll_loss=nll, reduction="none", **hparams)
    return LossResult(losses, cr, rr, {} if nll is None else {"nll_loss": nll.detach()})


@register("cpo", function=cpo_loss, provided=("policy_nll_loss",), nll_weight="cpo_alpha")
def _cpo_from_batch(batch: PairBatch, **hparams) -> LossResult:
    """CPO: reference-free sigmoid/hinge/ipo/simpo preference term plus the chosen NLL (AlphaPO with alpha)."""
    mean = hparams.get("loss_type", "sigmoid") in ("ipo", "simpo")  # as TRL's CPOTrainer averages them
    nll = batch.chosen_nll  # logged whatever cpo_alpha, as TRL's CPOTrainer does
    on = hyperparameter(cpo_loss, "cpo_alpha", hparams)
    losses, cr, rr = cpo_loss(*batch.logps(mean=mean), policy_nll_loss=nll if on else None, reduction="none",
                              **hparams)
    return LossResult(losses, cr, rr, {"nll_loss": nll.detach()})


@register("orpo", function=orpo_loss, provided=("policy_nll_loss",), nll_weight="nll_weight")
def _orpo_from_batch(batch: PairBatch, **hparams) -> LossResult:
    """ORPO: chosen NLL plus beta times the log-sigmoid of the odds ratio (mean log-probs)."""
    nll = batch.chosen_nll  # logged whatever nll_weight, as TRL's ORPOTrainer does
    pc, pr = batch.logps(mean=True)
    on = hyperparameter(orpo_loss, "nll_weight", hparams)
    losses, cr, rr = orpo_loss(pc, pr, policy_nll_loss=nll if on else None, reduction="none", **hparams)
    log_odds = orpo_log_odds(pc, pr).detach()
    metrics = {"nll_loss": nll.detach(), "log_odds_ratio": F.logsigmoid(log_odds).mean(), "log_odds_chosen": log_odds.mean()}
    return LossResult(losses, cr, rr, metrics)
