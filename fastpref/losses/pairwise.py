"""Pairwise losses with a reference model: DPO and every TRL ``loss_type``, DPOP, MMPO, TODO.

Inputs are per-pair (chosen, rejected) log-probs, usually SUMMED over completion tokens
(``SequenceStats.sum_logp``). Each function returns ``(losses, chosen_rewards, rejected_rewards)``:
losses reduced by ``reduction`` ("mean" over pairs by default, "sum", or "none" for per-pair values),
rewards per pair and detached (``beta * log-ratio``, TRL's convention).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from .. import _checks
from ._common import (
    check_label_smoothing,
    check_num_tokens,
    check_pair,
    detached,
    logratios,
    reduce,
    smoothed_logistic,
)
from .checks import as_bool_labels, check_choice, check_non_negative, check_number, check_positive, check_used
from .registry import LossResult, PairBatch, batch_sorted, register

DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
SMOOTHED_LOSS_TYPES = ("sigmoid", "exo_pair", "robust", "aot", "aot_unpaired")  # those that read label_smoothing
# Those that apply f'(pi/pi_ref) to the log-ratios (TRL's own list); the others read the plain log-ratios.
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


def f_divergence_scores(logratio: torch.Tensor, f_divergence_type: str, alpha: float = 0.5) -> torch.Tensor:
    """f-DPO: ``f'(pi/pi_ref)`` applied to a log-ratio (TRL >= 0.29 parametrisation)."""
    if f_divergence_type == "reverse_kl" or (f_divergence_type == "alpha_divergence" and abs(alpha - 1) < 1e-6):
        return logratio
    if f_divergence_type == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-logratio)
    if f_divergence_type == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(logratio)
    if f_divergence_type == "alpha_divergence":  # f'(t) = (t^(a-1) - 1) / (a - 1), exponent clamped as TRL does
        # in at least fp32, the exponent clamped so that the result stays finite in the input dtype
        t = ((alpha - 1) * logratio).to(torch.promote_types(logratio.dtype, torch.float32))
        t = t.clamp(max=11.0 if logratio.dtype == torch.float16 else 80.0)
        return (torch.expm1(t) / (alpha - 1)).to(logratio.dtype)
    check_choice("f_divergence_type", f_divergence_type, F_DIVERGENCES)


def _dpo_terms(name, *, u, beta, eps, tau, chosen_lr, rejected_lr, delta_norm, logps, ref_logps, nll):
    """Per-pair loss of one TRL ``loss_type``. ``u = beta * (score_w - score_l)``."""
    if name == "sigmoid":
        return smoothed_logistic(u, eps)
    if name == "hinge":
        return torch.relu(1 - u)
    if name == "ipo":  # on per-token MEAN log-ratios (delta_norm), as TRL and the IPO authors do
        return (delta_norm - 1 / (2 * beta)) ** 2
    if name == "sigmoid_norm":
        return -F.logsigmoid(beta * delta_norm)
    if name == "exo_pair":
        return torch.sigmoid(u) * (F.logsigmoid(u) - math.log1p(-eps)) + torch.sigmoid(-u) * (
            F.logsigmoid(-u) - math.log(eps)
        )
    if name == "nca_pair":
        rw, rl = beta * chosen_lr, beta * rejected_lr
        return -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)
    if name == "robust":
        return (-(1 - eps) * F.logsigmoid(u) + eps * F.logsigmoid(-u)) / (1 - 2 * eps)
    if name == "bco_pair":
        return -F.logsigmoid(beta * chosen_lr) - F.logsigmoid(-beta * rejected_lr)
    if name == "sppo_hard":
        return (chosen_lr - 0.5 / beta) ** 2 + (rejected_lr + 0.5 / beta) ** 2
    if name in ("aot", "aot_unpaired"):  # batch-coupled: sorts over the pairs of the batch
        if name == "aot":
            a, b = logps[0] - logps[1], ref_logps[0] - ref_logps[1]
        else:
            a, b = chosen_lr, rejected_lr
        delta = torch.sort(a, dim=0).values - torch.sort(b, dim=0).values
        return smoothed_logistic(beta * delta, eps)
    if name == "apo_zero":
        return (1 - torch.sigmoid(beta * chosen_lr)) + torch.sigmoid(beta * rejected_lr)
    if name == "apo_down":
        return torch.sigmoid(beta * chosen_lr) + (1 - torch.sigmoid(beta * (chosen_lr - rejected_lr)))
    if name == "discopop":
        mix = torch.sigmoid(u / tau)
        return -F.logsigmoid(u) * (1 - mix) + torch.exp(-u) * mix
    if name == "sft":
        return nll.expand_as(u)
    raise AssertionError(name)  # dpo_loss checked the names


def weighted_loss_types(loss_types: list[str], loss_weights) -> list[tuple[str, float]]:
    """``(loss type, weight)`` of the types whose ``loss_weights`` entry (non-negative; default 1 each) is
    nonzero: only these are computed, and the settings are checked against them. All weights 0 would train
    nothing: refused."""
    if loss_weights is None:
        return [(name, 1.0) for name in loss_types]
    if not isinstance(loss_weights, (list, tuple)):
        _checks.fail("loss_weights", f"must be a list of numbers, got {loss_weights!r}")
    if len(loss_weights) != len(loss_types):
        _checks.fail("loss_weights", f"has {len(loss_weights)} entries for {len(loss_types)} loss types")
    for w in loss_weights:
        check_non_negative("loss_weights", w)
    active = [(name, w) for name, w in zip(loss_types, loss_weights) if bool(w != 0)]
    if not active:
        _checks.fail("loss_weights", f"are all 0 ({list(loss_weights)}): the loss would be 0 and train nothing")
    return active


def check_dpo_settings(loss_types: list[str], *, f_divergence_type: str, f_alpha_divergence_coef: float,
                       discopop_tau: float) -> None:
    """The settings of :func:`dpo_loss` that act only with some loss types, refused where they would not act.

    Shared with the TRL trainer, which checks a ``DPOConfig`` with it at construction.
    """
    check_choice("f_divergence_type", f_divergence_type, F_DIVERGENCES)
    plain = sorted(set(loss_types) - set(F_DIVERGENCE_LOSS_TYPES))
    if f_divergence_type != "reverse_kl" and plain:
        _checks.fail("f_divergence_type", f"{f_divergence_type!r} is not applied by loss_type {plain} (they use the "
                                          f"plain log-ratios); it applies to {list(F_DIVERGENCE_LOSS_TYPES)}")
    if f_divergence_type != "reverse_kl" and set(loss_types) == {"sft"}:  # in TRL's list, but reads no log-ratio
        _checks.fail("f_divergence_type", f"{f_divergence_type!r} has no effect on loss_type 'sft' alone (the chosen "
                                          "NLL reads no log-ratio); combine it with a preference loss type")
    check_number("f_alpha_divergence_coef", f_alpha_divergence_coef)
    check_used("f_alpha_divergence_coef", f_alpha_divergence_coef, 0.5, used=f_divergence_type == "alpha_divergence",
               only="with f_divergence_type='alpha_divergence'")
    check_positive("discopop_tau", discopop_tau)
    check_used("discopop_tau", discopop_tau, 0.05, used="discopop" in loss_types, only="by loss_type 'discopop'")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str | list[str] = "sigmoid",
    loss_weights: list[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_num_tokens: torch.Tensor | None = None,
    rejected_num_tokens: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Direct Preference Optimisation and every loss of TRL's ``DPOTrainer`` (``loss_type``).

    With ``delta = s_w - s_l`` where ``s = f'(pi/pi_ref)`` of the log-ratio (identity for
    ``f_divergence_type="reverse_kl"``) and ``u = beta * delta``, ``sigmoid`` is ``-log sigma(u)``
    (``label_smoothing`` > 0 gives cDPO: ``-(1-eps) log sigma(u) - eps log sigma(-u)``); ``hinge``,
    ``ipo``, ``exo_pair``, ``nca_pair``, ``robust``, ``bco_pair``, ``sppo_hard``, ``aot``,
    ``aot_unpaired``, ``apo_zero``, ``apo_down``, ``discopop``, ``sft`` and ``sigmoid_norm`` follow
    TRL's formulas (docs/losses.md, section ``dpo``). A list of loss types sums them with ``loss_weights``
    (non-negative; default 1 each). A setting the chosen loss types would not read (``label_smoothing``,
    ``f_divergence_type``, ``f_alpha_divergence_coef``, ``discopop_tau``) must keep its default: a
    ``ValueError`` names it otherwise, where TRL would drop it.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed log-probs of the policy.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference log-probs; None = reference-free
            (log-ratios become the policy log-probs).
        beta: inverse temperature (IPO's tau).
        chosen_num_tokens, rejected_num_tokens: ``[B]`` completion lengths. ``ipo`` and
            ``sigmoid_norm`` divide the log-ratios by them (TRL's per-token normalisation); without
            them the inputs are taken as already length-normalised. ``sft`` needs them; the other loss
            types do not read them. Whole numbers >= 1.
        reduction: ``"mean"`` over pairs, ``"sum"``, or ``"none"`` (with ``aot`` / ``aot_unpaired`` the values
            belong to sorted positions of the batch, not to pairs: a ``UserWarning`` says so).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, rewards = ``beta * log-ratio`` (detached).
    """
    check_pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    check_positive("beta", beta, like=policy_chosen_logps)
    names = [loss_type] if isinstance(loss_type, str) else loss_type
    if not isinstance(names, (list, tuple)) or not names:
        _checks.fail("loss_type", f"must be a loss type or a non-empty list of them, got {loss_type!r}")
    for name in names:
        check_choice("loss_type", name, DPO_LOSS_TYPES)
    weighted = weighted_loss_types(names, loss_weights)
    active = [name for name, _ in weighted]
    check_dpo_settings(active, f_divergence_type=f_divergence_type,
                       f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau)
    if "exo_pair" in active:
        check_label_smoothing(label_smoothing, lower_open=True)  # log(eps) needs eps > 0; TRL suggests 1e-3
    elif "robust" in active:
        check_label_smoothing(label_smoothing, upper=0.5)
    else:
        check_label_smoothing(label_smoothing, loss_types=active, smoothed=SMOOTHED_LOSS_TYPES)
    if (chosen_num_tokens is None) != (rejected_num_tokens is None):
        _checks.fail("chosen_num_tokens", "and `rejected_num_tokens` must be given together")
    if chosen_num_tokens is not None:
        check_num_tokens("chosen_num_tokens", chosen_num_tokens, policy_chosen_logps)
        check_num_tokens("rejected_num_tokens", rejected_num_tokens, policy_chosen_logps)
    _checks.check_reduction(reduction)
    if reduction == "none" and batch_sorted(active):  # TRL's convention; the front door refuses it
        warnings.warn("fastpref: with loss_type 'aot'/'aot_unpaired', reduction='none' gives the losses of the batch's "
                      "SORTED log-ratios, not of the input pairs: do not weight or select them per pair",
                      UserWarning, stacklevel=2)
    if "sft" in active and chosen_num_tokens is None:
        _checks.fail("chosen_num_tokens", "is required by loss_type 'sft' (token-mean NLL of the chosen responses)")

    chosen_lr = logratios(policy_chosen_logps, ref_chosen_logps)
    rejected_lr = logratios(policy_rejected_logps, ref_rejected_logps)
    chosen_s = f_divergence_scores(chosen_lr, f_divergence_type, f_alpha_divergence_coef)
    rejected_s = f_divergence_scores(rejected_lr, f_divergence_type, f_alpha_divergence_coef)
    if chosen_num_tokens is None:
        delta_norm = chosen_s - rejected_s
        nll = None
    else:
        delta_norm = chosen_s / chosen_num_tokens - rejected_s / rejected_num_tokens
        nll = -policy_chosen_logps.sum() / chosen_num_tokens.sum()
    ref_logps = (
        (torch.zeros_like(policy_chosen_logps),) * 2
        if ref_chosen_logps is None
        else (ref_chosen_logps, ref_rejected_logps)
    )
    terms = dict(
        u=beta * (chosen_s - rejected_s), beta=beta, eps=label_smoothing, tau=discopop_tau,
        chosen_lr=chosen_lr, rejected_lr=rejected_lr, delta_norm=delta_norm,
        logps=(policy_chosen_logps, policy_rejected_logps), ref_logps=ref_logps, nll=nll,
    )
    losses = sum(w * _dpo_terms(name, **terms) for name, w in weighted)
    return (reduce(losses, reduction), *detached(beta * chosen_lr, beta * rejected_lr))


def dpop_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.3,
    dpop_lambda: float = 50.0,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""DPO-Positive (Smaug): ``-log sigma(beta [Delta - lambda max(0, log pi_ref(y_w) - log pi(y_w))])``.

    Penalises any drop of the chosen log-prob below the reference. Defaults ``beta=0.3``,
    ``dpop_lambda=50`` follow the Smaug report's recipe as commonly reproduced (not verified against
    an official implementation; see docs/losses.md#dpop).
    """
    check_pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, reference="required")
    check_positive("beta", beta, like=policy_chosen_logps)
    check_non_negative("dpop_lambda", dpop_lambda, like=policy_chosen_logps)
    chosen_lr = policy_chosen_logps - ref_chosen_logps
    rejected_lr = policy_rejected_logps - ref_rejected_logps
    penalty = dpop_lambda * torch.relu(ref_chosen_logps - policy_chosen_logps)
    losses = -F.logsigmoid(beta * (chosen_lr - rejected_lr - penalty))
    return (reduce(losses, reduction), *detached(beta * chosen_lr, beta * rejected_lr))


def mmpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.01,
    soft_labels: torch.Tensor | None = None,
    chosen_scores: torch.Tensor | None = None,
    rejected_scores: torch.Tensor | None = None,
    bt_beta: float | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Margin-Matching PO: DPO against a soft target ``p``: ``-p log sigma(u) - (1-p) log sigma(-u)``.

    ``p`` is ``soft_labels`` (``[B]`` in [0, 1]), or the Bradley-Terry probability
    ``sigma(bt_beta * (chosen_scores - rejected_scores))`` of quality scores; neither gives ``p = 1``
    (plain DPO); ``p`` is a target and carries no gradient. ``beta=0.01`` is the official recipe's value.
    """
    check_pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, reference="required")
    check_positive("beta", beta, like=policy_chosen_logps)
    if soft_labels is not None:
        if chosen_scores is not None or rejected_scores is not None or bt_beta is not None:
            _checks.fail("soft_labels", "and `chosen_scores`/`rejected_scores`/`bt_beta` are alternatives; pass one")
        _checks.per_example("soft_labels", soft_labels, policy_chosen_logps)
        check_number("soft_labels", soft_labels, low=0, high=1)
        p = soft_labels
    elif chosen_scores is not None or rejected_scores is not None:
        _checks.per_example("chosen_scores", chosen_scores, policy_chosen_logps)
        _checks.per_example("rejected_scores", rejected_scores, policy_chosen_logps)
        if bt_beta is None:
            _checks.fail("bt_beta", "is required with chosen_scores/rejected_scores")
        check_positive("bt_beta", bt_beta, like=policy_chosen_logps)
        check_number("chosen_scores", chosen_scores)
        check_number("rejected_scores", rejected_scores)
        p = torch.sigmoid(bt_beta * (chosen_scores - rejected_scores))
    elif bt_beta is not None:
        _checks.fail("bt_beta", "needs `chosen_scores` and `rejected_scores` (the quality scores it scales)")
    else:
        p = torch.ones_like(policy_chosen_logps)
    p = p.detach()  # a target: no gradient flows into the labels or scores
    chosen_lr = policy_chosen_logps - ref_chosen_logps
    rejected_lr = policy_rejected_logps - ref_rejected_logps
    u = beta * (chosen_lr - rejected_lr)
    losses = -p * F.logsigmoid(u) - (1 - p) * F.logsigmoid(-u)
    return (reduce(losses, reduction), *detached(beta * chosen_lr, beta * rejected_lr))


def todo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    ties: torch.Tensor,
    beta: float = 0.01,
    tie_alpha: float = 0.5,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""TODO (ternary preferences with ties), with ``u = beta * Delta`` and ``alpha = tie_alpha > 0``:

    * non-tie pair: ``-(1-eps) log sigma(u - alpha) - eps log sigma(alpha - u)``
    * tie pair: ``-log(e^{2 alpha} - 1) + softplus(alpha + u) + softplus(alpha - u)``

    ``ties`` is a ``[B]`` bool/0-1 tensor. ``tie_alpha=0.5`` is the official configs' ``-dpo_theta``.
    """
    check_pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, reference="required")
    check_positive("beta", beta, like=policy_chosen_logps)
    check_positive("tie_alpha", tie_alpha, scalar=True)
    check_label_smoothing(label_smoothing)
    _checks.tensor("ties", ties, ndim=1)
    if ties.shape != policy_chosen_logps.shape:
        _checks.fail("ties", f"has shape {tuple(ties.shape)} but there are {policy_chosen_logps.shape[0]} pairs")
    _checks.same_device("ties", ties, "policy_chosen_logps", policy_chosen_logps)
    ties = as_bool_labels("ties", ties)
    chosen_lr = policy_chosen_logps - ref_chosen_logps
    rejected_lr = policy_rejected_logps - ref_rejected_logps
    u = beta * (chosen_lr - rejected_lr)
    non_tie = smoothed_logistic(u - tie_alpha, label_smoothing)
    tie = -math.log(math.expm1(2 * tie_alpha)) + F.softplus(tie_alpha + u) + F.softplus(tie_alpha - u)
    losses = torch.where(ties, tie, non_tie)
    return (reduce(losses, reduction), *detached(beta * chosen_lr, beta * rejected_lr))


# ---- fused front-door adapters (see fastpref.losses.registry) ----


@register("dpo", function=dpo_loss, provided=("chosen_num_tokens", "rejected_num_tokens"), reference="required")
def _dpo_from_batch(batch: PairBatch, **hparams) -> LossResult:
    """DPO and every TRL loss_type (summed log-probs; ipo / sigmoid_norm per-token normalised)."""
    nw, nl = batch.num_tokens
    if not batch_sorted(hparams.get("loss_type", "sigmoid")):
        return LossResult(*dpo_loss(*batch.inputs(mean=False), chosen_num_tokens=nw, rejected_num_tokens=nl,
                                    reduction="none", **hparams))
    # AOT sorts the batch: no per-pair losses; their mean, once per pair, gives the front door's mean and sum
    mean, cr, rr = dpo_loss(*batch.inputs(mean=False), chosen_num_tokens=nw, rejected_num_tokens=nl, **hparams)
    return LossResult(mean.expand(cr.shape), cr, rr)


@register("dpop", function=dpop_loss, reference="required")
def _dpop_from_batch(batch: PairBatch, **hparams) -> LossResult:
    """DPO-Positive (Smaug): DPO with a penalty on chosen log-probs falling below the reference."""
    return LossResult(*dpop_loss(*batch.inputs(mean=False), reduction="none", **hparams))


@register("mmpo", function=mmpo_loss, reference="required")
def _mmpo_from_batch(batch: PairBatch, **hparams) -> LossResult:
    """Margin-Matching PO: DPO against soft Bradley-Terry labels from quality scores."""
    return LossResult(*mmpo_loss(*batch.inputs(mean=False), reduction="none", **hparams))


@register("todo", function=todo_loss, reference="required")
def _todo_from_batch(batch: PairBatch, **hparams) -> LossResult:
    """TODO: ternary preferences (ties) with a tie margin alpha."""
    return LossResult(*todo_loss(*batch.inputs(mean=False), reduction="none", **hparams))
