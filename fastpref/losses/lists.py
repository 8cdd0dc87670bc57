"""Helpers shared by the list losses: ``[B, K]`` input checks, ranking, ordered pairs, list metrics.

Convention of every list loss (``fastpref.losses.listwise``, ``fastpref.losses.mppo``): per-response
tensors are ``[B, K]`` (row b: prompt b's K responses); ``mask [B, K]`` (bool, True = a real
response) pads lists of different sizes; responses are best first unless ``scores [B, K]`` (higher
is better) are given, in which case each list is sorted by them, ties keeping the given order.
"""

from __future__ import annotations

import torch

from .. import _checks


def check_list(name: str, x, like: torch.Tensor | None = None, like_name: str = "policy_logps") -> None:
    """A per-response ``[B, K]`` floating tensor, shaped like ``like``."""
    _checks.tensor(name, x, ndim=2)
    if not x.dtype.is_floating_point:
        _checks.fail(name, f"must be floating point, got {x.dtype}")
    if like is not None:
        if x.shape != like.shape:
            _checks.fail(name, f"has shape {tuple(x.shape)} but `{like_name}` has {tuple(like.shape)}")
        _checks.same_device(name, x, like_name, like)


def per_prompt(name: str, value, like: torch.Tensor):
    """A checked hyperparameter of a list loss (number, 0-d or ``[B]`` tensor) ready to scale ``[B, K]`` values:
    a ``[B]`` tensor (one value per prompt) becomes ``[B, 1]``, so that it does not broadcast over the K responses."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if value.shape[0] != like.shape[0]:
        _checks.fail(name, f"has {value.shape[0]} entries for {like.shape[0]} prompts (one per prompt, or a number)")
    _checks.same_device(name, value, "policy_logps", like)
    return value[:, None]


def list_mask(
    logps: torch.Tensor,
    mask: torch.Tensor | None,
    scores: torch.Tensor | None,
    *,
    name: str = "policy_logps",
    scores_required: str | None = None,
    unit_scores: bool = False,
) -> torch.Tensor:
    """Validates ``[B, K]`` list inputs; returns the mask (all True when None).

    Every list needs two responses; ``scores`` must be finite (and in [0, 1] with ``unit_scores``, for
    losses whose scores are targets). ``scores_required`` names the loss when it cannot run without
    scores. One host synchronisation when ``mask`` or ``scores`` is given.
    """
    check_list(name, logps)
    batch, k = logps.shape
    if batch == 0:
        _checks.fail(name, "is empty: a list loss needs at least one prompt")
    if scores is None and scores_required:
        _checks.fail("scores", f"is required by {scores_required}")
    checks = {}
    if scores is not None:
        check_list("scores", scores, logps, like_name=name)
        checks["scores"] = ~torch.isfinite(scores).all()
    if mask is None:
        if k < 2:
            _checks.fail(name, f"has K={k} response per prompt; a list needs at least 2")
        mask = torch.ones_like(logps, dtype=torch.bool)
    else:
        _checks.tensor("mask", mask, ndim=2)
        if mask.dtype != torch.bool:
            _checks.fail("mask", f"must be a bool tensor, got {mask.dtype}")
        if mask.shape != logps.shape:
            _checks.fail("mask", f"has shape {tuple(mask.shape)} but `{name}` has {tuple(logps.shape)}")
        _checks.same_device("mask", mask, name, logps)
        checks["mask"] = (mask.sum(1) < 2).any()
    if scores is not None and unit_scores:
        checks["unit"] = (((scores < 0) | (scores > 1)) & mask).any()
    if checks:
        bad = dict(zip(checks, torch.stack(list(checks.values())).tolist()))
        if bad.get("scores"):
            _checks.fail("scores", "contains NaN or Inf")
        if bad.get("unit"):
            _checks.fail("scores", f"must be in [0, 1] (targets for p = exp(mean logp)), got "
                                   f"{scores[mask].flatten()[:8].tolist()}; rescale ratings first, e.g. 1-10 "
                                   "scores divided by 10 as the MPPO paper does")
        if bad.get("mask"):
            short = (mask.sum(1) < 2).nonzero().flatten().tolist()
            _checks.fail("mask", f"leaves fewer than 2 responses in lists {short[:8]}; a list needs at least 2")
    return mask


def ranked(mask: torch.Tensor, scores: torch.Tensor | None, *xs: torch.Tensor):
    """Each list sorted best first (by ``scores``, ties in the given order; else as given), padding last.

    Returns ``(mask, scores, *xs)`` sorted the same way (``scores`` None when not given). Sorting
    keys carry no gradient; the ``xs`` keep theirs through the gather.
    """
    k = mask.shape[1]
    if scores is None:
        key = -torch.arange(k, device=mask.device, dtype=torch.float32).expand(mask.shape)
    else:
        key = scores.detach().float()
    key = key.masked_fill(~mask, float("-inf"))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    sort = [None if x is None else x.gather(1, order) for x in (mask, scores, *xs)]
    return tuple(sort)


def ordered_pairs(mask: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
    """``[B, K, K]`` bool: ``(i, j)`` is a pair of a sorted list with i ranked above j.

    With scores only strictly different scores make a pair (ties skipped); in rank order every
    ``i < j`` of the list does.
    """
    k = mask.shape[1]
    upper = torch.ones(k, k, dtype=torch.bool, device=mask.device).triu(1)
    pairs = upper & mask[:, :, None] & mask[:, None, :]
    if scores is not None:
        pairs = pairs & (scores[:, :, None] > scores[:, None, :])
    return pairs


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is True (0 where there are none)."""
    total = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim)
    return total / mask.sum(dim).clamp(min=1)


def best_index(mask: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
    """``[B]`` column of each list's best response (highest score, first among ties; else column 0)."""
    if scores is None:
        return mask.float().argmax(1)  # first real response
    return scores.detach().float().masked_fill(~mask, float("-inf")).argmax(1)


def list_metrics(
    rewards: torch.Tensor, sum_logps: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor | None
) -> dict:
    """TRL-named metrics for lists: the best response is "chosen", the others "rejected".

    ``rewards/chosen``: mean reward of the best responses; ``rewards/rejected``: mean over prompts of
    the mean reward of the other responses; ``rewards/margins``: their difference;
    ``rewards/accuracies``: fraction of the ordered pairs of the batch (strictly different scores)
    whose rewards are in the same strict order; ``logps/chosen|rejected`` likewise with summed
    log-probs.
    """
    mask, scores, r, lp = ranked(mask, scores, rewards.detach().float(), sum_logps.detach().float())
    rest = mask.clone()
    rest[:, 0] = False
    chosen, rejected = r[:, 0], masked_mean(r, rest)
    pairs = ordered_pairs(mask, scores)
    correct = pairs & (r[:, :, None] > r[:, None, :])
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": correct.sum() / pairs.sum().clamp(min=1),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": lp[:, 0].mean(),
        "logps/rejected": masked_mean(lp, rest).mean(),
    }
