"""Listwise losses on K ranked responses per prompt: PRO, List-MLE / DPO-Plackett-Luce, LiPO-lambda.

Convention (see :mod:`fastpref.losses.lists`): per-response inputs are ``[B, K]``; ``mask [B, K]``
(bool) pads lists of different sizes; responses are best first unless ``scores [B, K]`` (higher is
better) are given. Each function returns ``(losses, rewards)``: losses reduced by ``reduction``
("mean" over prompts by default, "sum", or "none" for ``[B]``), rewards ``[B, K]`` per response in
the input order, detached (0 at padding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _checks
from ._common import logratios, reduce
from .checks import check_non_negative, check_positive
from .lists import check_list, list_mask, per_prompt, ranked
from .registry import GroupBatch, ListLossResult, register


def _detached_rewards(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x.detach(), torch.zeros((), dtype=x.dtype, device=x.device))


def _suffix_logsumexp(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log sum_{j >= i, j real} exp(s_j)`` for every i of lists sorted with padding last.

    Built on a ``[B, K, K]`` mask rather than ``logcumsumexp``, whose backward turns the padding's
    ``-inf`` into NaN. A padded i sees only itself, so every row has a finite term.
    """
    k = s.shape[1]
    eye = torch.eye(k, dtype=torch.bool, device=s.device)
    later = torch.ones(k, k, dtype=torch.bool, device=s.device).triu() & (mask[:, None, :] | eye)
    return torch.logsumexp(s[:, None, :].masked_fill(~later, float("-inf")), dim=-1)


def plackett_luce_nll(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` ``-sum_i [s_i - log sum_{j >= i} exp(s_j)]`` of lists sorted best first, padding last."""
    terms = logits - _suffix_logsumexp(logits, mask)
    return -torch.where(mask, terms, torch.zeros((), dtype=terms.dtype, device=terms.device)).sum(1)


def list_mle_loss(
    logits: torch.Tensor,
    scores: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""List-MLE: the Plackett-Luce negative log-likelihood of the ranking under per-response ``logits``.

    ``-sum_{i=1}^{K} [ s_(i) - log sum_{j >= i} exp(s_(j)) ]`` with ``s_(i)`` the logit of the i-th
    best response (the last term is 0). Ties in ``scores`` keep the given order. Rewards are the logits.
    """
    mask = list_mask(logits, mask, scores, name="logits")
    mask_s, _, s = ranked(mask, scores, logits)
    return reduce(plackett_luce_nll(s, mask_s), reduction), _detached_rewards(logits, mask)


def dpo_plackett_luce_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    beta: float = 0.1,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""DPO under the Plackett-Luce model (DPO-PL; = LiPO's list-MLE): List-MLE on ``beta * log-ratios``.

    ``s_k = beta * (log pi(y_k) - log pi_ref(y_k))`` from SUMMED log-probs (no reference: the policy
    log-probs). With K = 2 it is exactly DPO's sigmoid loss. Rewards are ``s``.
    """
    mask = list_mask(policy_logps, mask, scores)
    if ref_logps is not None:
        check_list("ref_logps", ref_logps, policy_logps)
    check_positive("beta", beta, like=policy_logps)
    s = per_prompt("beta", beta, policy_logps) * logratios(policy_logps, ref_logps)
    mask_s, _, s_sorted = ranked(mask, scores, s)
    return reduce(plackett_luce_nll(s_sorted, mask_s), reduction), _detached_rewards(s, mask)


def _pro_terms(
    policy_logps: torch.Tensor,
    scores: torch.Tensor | None,
    policy_sum_logps: torch.Tensor | None,
    *,
    mask: torch.Tensor | None = None,
    sft_weight: float = 0.05,
    eps: float = 1e-10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PRO's per-stage losses ``[B, K-1]``, stage mask, SFT term ``[B]`` and the validated mask."""
    mask = list_mask(policy_logps, mask, scores, scores_required="PRO (its temperatures are reward differences)")
    check_positive("eps", eps, scalar=True)
    check_non_negative("sft_weight", sft_weight, scalar=True)
    if sft_weight:
        if policy_sum_logps is None:
            _checks.fail("policy_sum_logps", "is required by PRO's SFT term (sft_weight != 0): summed log-probs")
        check_list("policy_sum_logps", policy_sum_logps, policy_logps)
    k = policy_logps.shape[1]
    mask_s, r, s, sums = ranked(mask, scores, policy_logps, policy_sum_logps)
    r = r.detach().to(s.dtype)
    later = torch.ones(k, k, dtype=torch.bool, device=s.device).triu(1) & mask_s[:, None, :]  # [b, k, j]: j > k
    stage = later.any(-1)  # stage k exists: a real response ranked below k
    temp = r[:, :, None] - r[:, None, :]  # T_kj = r_k - r_j >= 0 for j > k
    t_kk = torch.where(stage, temp.masked_fill(~later, float("-inf")).amax(-1), 0.0)
    own = s * t_kk
    others = (s[:, None, :] * temp).masked_fill(~later, float("-inf"))
    log_eps = torch.full_like(own, math.log(eps))[..., None]
    stages = torch.logsumexp(torch.cat([others, own[..., None], log_eps], dim=-1), dim=-1) - own
    stages = torch.where(stage, stages, 0.0)[:, :-1]
    if sft_weight:
        n = mask.sum(1).to(s.dtype)
        sft = sft_weight * (n - 1) ** 2 * -sums[:, 0]
    else:
        sft = torch.zeros_like(s[:, 0])
    return stages, stage[:, :-1], sft, mask


def pro_loss(
    policy_logps: torch.Tensor,
    scores: torch.Tensor,
    policy_sum_logps: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    sft_weight: float = 0.05,
    eps: float = 1e-10,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Preference Ranking Optimisation (Song et al., AAAI 2024), as the official code computes it.

    Responses sorted by reward-model score ``r_1 >= ... >= r_n``, policy scores ``s_k`` = per-token
    MEAN log-probs (``policy_logps``)::

        T_kj = r_k - r_j  (j > k),   T_kk = max_{j>k} T_kj
        L_k  = log(eps + exp(s_k T_kk) + sum_{j>k} exp(s_j T_kj)) - s_k T_kk        k = 1 .. n-1
        loss = sum_k L_k + sft_weight * (n-1)^2 * (-S(y_1))

    with ``S(y_1)`` the SUMMED log-prob of the best response (``policy_sum_logps``, needed when
    ``sft_weight != 0``). ``scores`` are the raw reward-model scores (required: they set the
    temperatures). ``sft_weight = 0.05`` is the released run scripts' value (argparse default 2).
    The mean over prompts of the per-prompt sums is the official ``sum_k mean_batch(L_k)``; a prompt
    with fewer responses simply has fewer stages. Rewards are ``s``.
    """
    if policy_sum_logps is not None and isinstance(sft_weight, (int, float)) and sft_weight == 0:
        _checks.fail("policy_sum_logps", "is given but sft_weight=0 leaves PRO's SFT term out; set sft_weight > 0 "
                                         "to add it, or do not pass it")
    stages, _, sft, mask = _pro_terms(
        policy_logps, scores, policy_sum_logps, mask=mask, sft_weight=sft_weight, eps=eps
    )
    return reduce(stages.sum(1) + sft, reduction), _detached_rewards(policy_logps, mask)


def lipo_lambda_weights(model_scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""LiPO-lambda's ``[B, K, K]`` weights ``lambda_ij = K |G_i - G_j| |D(r_i) - D(r_j)|`` (no gradient).

    ``G = 2^psi - 1`` (gain of the label), ``D(r) = 1 / log2(1 + r)`` with ``r`` the 1-based rank of
    the response under the current ``model_scores`` (descending, ties in the given order, padding
    last): RAX's ``dcg_lambdaweight``. ``K`` is the list's own number of responses (RAX's list size
    for unpadded lists).
    """
    dtype = torch.promote_types(model_scores.dtype, torch.float32)  # fp32 at least, fp64 when given fp64
    key = model_scores.detach().to(dtype).masked_fill(~mask, float("-inf"))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    ranks = order.argsort(1).to(dtype) + 1
    gain = torch.exp2(labels.detach().to(dtype)) - 1
    discount = 1 / torch.log2(1 + ranks)
    size = mask.sum(1).to(dtype)[:, None, None]
    lam = size * (gain[:, :, None] - gain[:, None, :]).abs() * (discount[:, :, None] - discount[:, None, :]).abs()
    return lam.to(model_scores.dtype)


def lipo_lambda_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    scores: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    beta: float = 0.05,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""LiPO-lambda (Liu et al., NAACL 2025): lambda-weighted pairwise logistic loss over each list.

    ``s_i = beta * (log pi(y_i) - log pi_ref(y_i))`` (SUMMED log-probs), labels ``psi = scores``
    (required; graded relevance: the paper's are in [0, 1], larger grades weigh a pair by the DCG gain
    ``2^psi - 1``, so 0-10 ratings give a much steeper objective than the same ratings / 10)::

        L = mean over the batch's pairs (psi_i > psi_j) of  lambda_ij * log(1 + exp(-(s_i - s_j)))

    with :func:`lipo_lambda_weights` (RAX ``pairwise_logistic_loss`` with ``dcg_lambdaweight``; the
    mean runs over all valid pairs of the batch, lists without a pair add 0). The per-prompt values
    (``reduction="none"``) are each list's pair sum times ``B / (number of pairs in the batch)``, so
    that their mean is that batch mean. ``beta = 0.05`` is the paper's. With K = 2 and labels (1, 0)
    this is ``2 (1 - 1/log2 3)`` times DPO. Rewards are ``s``.
    """
    mask = list_mask(policy_logps, mask, scores, scores_required="LiPO-lambda (the labels psi)")
    if ref_logps is not None:
        check_list("ref_logps", ref_logps, policy_logps)
    check_positive("beta", beta, like=policy_logps)
    s = per_prompt("beta", beta, policy_logps) * logratios(policy_logps, ref_logps)
    pairs = (scores[:, :, None] > scores[:, None, :]) & mask[:, :, None] & mask[:, None, :]
    pair_losses = lipo_lambda_weights(s, scores, mask) * F.softplus(-(s[:, :, None] - s[:, None, :]))
    per_list = torch.where(pairs, pair_losses, torch.zeros((), dtype=s.dtype, device=s.device)).sum((1, 2))
    losses = per_list * (s.shape[0] / pairs.sum().clamp(min=1).to(s.dtype))
    return reduce(losses, reduction), _detached_rewards(s, mask)


# ---- fused front-door adapters (see fastpref.losses.registry) ----


@register("pro", function=pro_loss, provided=("mask",), layout="groups")
def _pro_from_batch(batch: GroupBatch, **hparams) -> ListLossResult:
    """PRO: reward-scaled Plackett-Luce on mean log-probs plus an SFT term on the best response."""
    stages, has_stage, sft, _ = _pro_terms(batch.logps(mean=True), batch.scores, batch.logps(mean=False),
                                           mask=batch.mask, **hparams)
    per_stage = stages.detach().sum(0) / has_stage.sum(0).clamp(min=1)
    metrics = {f"rank_{k + 1}_loss": v for k, v in enumerate(per_stage)}
    metrics["sft_loss"] = sft.detach().mean()
    return ListLossResult(stages.sum(1) + sft, _detached_rewards(batch.logps(mean=True), batch.mask), metrics)


@register("dpo_plackett_luce", function=dpo_plackett_luce_loss, provided=("mask",), reference="required",
          layout="groups")
def _dpo_pl_from_batch(batch: GroupBatch, **hparams) -> ListLossResult:
    """DPO-Plackett-Luce: List-MLE of the ranking on beta * summed log-ratios (K = 2: DPO)."""
    out = dpo_plackett_luce_loss(batch.logps(mean=False), batch.ref_logps(mean=False), batch.scores,
                                 mask=batch.mask, reduction="none", **hparams)
    return ListLossResult(*out)


@register("lipo_lambda", function=lipo_lambda_loss, provided=("mask",), reference="required", layout="groups")
def _lipo_from_batch(batch: GroupBatch, **hparams) -> ListLossResult:
    """LiPO-lambda: DCG-lambda-weighted pairwise logistic loss on beta * summed log-ratios."""
    out = lipo_lambda_loss(batch.logps(mean=False), batch.ref_logps(mean=False), batch.scores,
                           mask=batch.mask, reduction="none", **hparams)
    return ListLossResult(*out)
