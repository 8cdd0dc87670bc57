"""MPPO (Xie et al., COLING 2025): reference-free list losses on the geometric-mean likelihood.

Every variant scores a response by ``p(y) = exp(A(y))``, the geometric mean of its token
probabilities (``A`` = per-token MEAN log-prob, ``policy_logps``), with no reference model, beta or
margin. Inputs follow the list convention of :mod:`fastpref.losses.listwise`: ``[B, K]`` per
response, ``mask`` for lists of different sizes, best first unless ``scores`` say otherwise. The
"best" response ``w`` is the first of the highest-scored ones; the others are the N = K - 1
negatives. Each function returns ``(losses, rewards)`` with rewards ``p`` (detached, input order).
No official code exists; the choices the paper leaves open are documented per function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks
from ._common import reduce
from .checks import check_choice
from .lists import list_mask, masked_mean, ordered_pairs, ranked
from .listwise import plackett_luce_nll
from .reference_free import log1mexp
from .registry import GroupBatch, ListLossResult, register

NEGATIVES = ("random", "worst")


def _likelihoods(policy_logps, scores, mask):
    """Validated mask, and each list sorted best first: ``(mask, sorted mask, sorted scores, sorted p)``."""
    mask = list_mask(policy_logps, mask, scores)
    mask_s, scores_s, p_s = ranked(mask, scores, torch.exp(policy_logps))
    return mask, mask_s, scores_s, p_s


def _rewards(policy_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, torch.exp(policy_logps.detach()), torch.zeros((), dtype=policy_logps.dtype,
                                                                            device=policy_logps.device))


def _negatives(mask_s: torch.Tensor) -> torch.Tensor:
    """The responses ranked below the best one (sorted layout)."""
    rest = mask_s.clone()
    rest[:, 0] = False
    return rest


def _register(name: str, fn) -> None:
    """Front-door adapter: mean log-probs and the group's scores/mask straight into ``fn``."""

    def compute(batch: GroupBatch, **hparams) -> ListLossResult:
        return ListLossResult(*fn(batch.logps(mean=True), batch.scores, mask=batch.mask, reduction="none", **hparams))

    compute.__doc__ = fn.__doc__
    register(name, function=fn, provided=("mask",), layout="groups")(compute)


def mppo_point_ce_loss(
    policy_logps: torch.Tensor,
    scores: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""MPPO Point-CE: ``-E[s log p + (1 - s) log(1 - p)]``, ``p = exp(A)``, targets ``s = scores`` in [0, 1].

    The paper divides UltraFeedback's 1-10 scores by 10; scores outside [0, 1] are refused. Per prompt:
    the mean over its responses. ``log(1 - p)`` uses ``log1mexp`` (``A`` capped just below 0, so ``p = 1``
    gives a large finite loss).
    """
    mask = list_mask(policy_logps, mask, scores, scores_required="MPPO Point-CE (targets in [0, 1])",
                     unit_scores=True)
    a, s = policy_logps, scores.detach()  # the scores are targets: no gradient, as MMPO's and PRO's
    log_not_p = log1mexp(a.clamp(max=-torch.finfo(a.dtype).tiny))
    per_response = -(s * a + (1 - s) * log_not_p)
    return reduce(masked_mean(per_response, mask), reduction), _rewards(policy_logps, mask)


_register("mppo_point_ce", mppo_point_ce_loss)


def mppo_point_mse_loss(
    policy_logps: torch.Tensor,
    scores: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""MPPO Point-MSE: ``E[(s - p)^2]``, ``p = exp(A)``, targets ``s = scores`` in [0, 1].

    The paper prints a leading minus, a typo (minimising it would push p away from s). Scores outside
    [0, 1] are refused. Per prompt: the mean over its responses.
    """
    mask = list_mask(policy_logps, mask, scores, scores_required="MPPO Point-MSE (targets in [0, 1])",
                     unit_scores=True)
    per_response = (scores.detach() - torch.exp(policy_logps)) ** 2  # the scores are targets: no gradient
    return reduce(masked_mean(per_response, mask), reduction), _rewards(policy_logps, mask)


_register("mppo_point_mse", mppo_point_mse_loss)


def mppo_pair_single_loss(
    policy_logps: torch.Tensor,
    scores: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    negative: str = "random",
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""MPPO Pair-Single: ``-log sigma(p_w - p_l)`` against ONE negative ``l`` per prompt.

    ``negative="random"`` (the paper): ``l`` uniform among the prompt's non-best responses, drawn
    from ``generator`` (seed it for reproducible runs) or torch's global RNG; ``"worst"``: the
    lowest-ranked response (deterministic).
    """
    mask, mask_s, _, p = _likelihoods(policy_logps, scores, mask)
    rest = _negatives(mask_s)
    check_choice("negative", negative, NEGATIVES)
    if generator is not None and not isinstance(generator, torch.Generator):
        _checks.fail("generator", f"must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and negative != "random":
        _checks.fail("generator", f"draws the random negative; negative={negative!r} draws none")
    if negative == "random":
        device = generator.device if generator is not None else p.device
        u = torch.rand(p.shape, generator=generator, device=device).to(p.device)
        pick = u.masked_fill(~rest, -1.0).argmax(1)
    else:
        pick = mask_s.sum(1) - 1
    losses = -F.logsigmoid(p[:, 0] - p.gather(1, pick[:, None])[:, 0])
    return reduce(losses, reduction), _rewards(policy_logps, mask)


_register("mppo_pair_single", mppo_pair_single_loss)


def mppo_pair_mns_loss(
    policy_logps: torch.Tensor,
    scores: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""MPPO Pair-MNS: ``-sum_{i=1}^{N} log sigma(p_w - p_{l_i})`` (a sum over the N negatives)."""
    mask, mask_s, _, p = _likelihoods(policy_logps, scores, mask)
    terms = -F.logsigmoid(p[:, :1] - p)
    losses = torch.where(_negatives(mask_s), terms, torch.zeros((), dtype=p.dtype, device=p.device)).sum(1)
    return reduce(losses, reduction), _rewards(policy_logps, mask)


_register("mppo_pair_mns", mppo_pair_mns_loss)


def mppo_pair_mnm_loss(
    policy_logps: torch.Tensor,
    scores: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""MPPO Pair-MNM (the paper's best variant): ``-log sigma(N p_w - sum_{i=1}^{N} p_{l_i})``."""
    mask, mask_s, _, p = _likelihoods(policy_logps, scores, mask)
    rest = _negatives(mask_s)
    negatives = torch.where(rest, p, torch.zeros((), dtype=p.dtype, device=p.device)).sum(1)
    losses = -F.logsigmoid(rest.sum(1).to(p.dtype) * p[:, 0] - negatives)
    return reduce(losses, reduction), _rewards(policy_logps, mask)


_register("mppo_pair_mnm", mppo_pair_mnm_loss)


def _pair_differences(policy_logps, scores, mask):
    """``p_hi - p_lo`` for every score-ordered pair ``[B, K, K]`` and the pair mask."""
    mask, mask_s, scores_s, p = _likelihoods(policy_logps, scores, mask)
    return mask, p[:, :, None] - p[:, None, :], ordered_pairs(mask_s, scores_s)


def mppo_pair_mcs_loss(
    policy_logps: torch.Tensor,
    scores: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""MPPO Pair-MCS: ``-sum_{pairs} log sigma(p_hi - p_lo)`` over all C(K, 2) score-ordered pairs.

    Pairs with equal scores are skipped; in rank order (no scores) every pair counts.
    """
    mask, diff, pairs = _pair_differences(policy_logps, scores, mask)
    terms = torch.where(pairs, -F.logsigmoid(diff), torch.zeros((), dtype=diff.dtype, device=diff.device))
    return reduce(terms.sum((1, 2)), reduction), _rewards(policy_logps, mask)


_register("mppo_pair_mcs", mppo_pair_mcs_loss)


def mppo_pair_mcm_loss(
    policy_logps: torch.Tensor,
    scores: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""MPPO Pair-MCM: ``-log sigma(sum_{pairs} (p_hi - p_lo))`` over the pairs of :func:`mppo_pair_mcs_loss`.

    A list whose scores are all tied has no pair and contributes ``log 2`` (no gradient).
    """
    mask, diff, pairs = _pair_differences(policy_logps, scores, mask)
    total = torch.where(pairs, diff, torch.zeros((), dtype=diff.dtype, device=diff.device)).sum((1, 2))
    return reduce(-F.logsigmoid(total), reduction), _rewards(policy_logps, mask)


_register("mppo_pair_mcm", mppo_pair_mcm_loss)


def mppo_list_mle_loss(
    policy_logps: torch.Tensor,
    scores: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""MPPO List-MLE: ``-sum_{i=1}^{K} [p_i - log sum_{j >= i} exp(p_j)]``, responses sorted best first.

    Plackett-Luce on the likelihoods ``p`` (not the log-probs); tied scores keep the given order.
    """
    mask, mask_s, _, p = _likelihoods(policy_logps, scores, mask)
    return reduce(plackett_luce_nll(p, mask_s), reduction), _rewards(policy_logps, mask)


_register("mppo_list_mle", mppo_list_mle_loss)
