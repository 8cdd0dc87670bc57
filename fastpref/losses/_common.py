"""Helpers shared by the level-3 losses: input checks, log-ratios, label smoothing, reductions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks
from .._checks import reduce  # noqa: F401  (re-exported for the loss modules)


def check_pair(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    reference: str = "optional",
) -> None:
    """Validates the four per-pair log-prob tensors; ``reference`` is "required", "optional" or "none"."""
    _checks.per_example("policy_chosen_logps", policy_chosen_logps)
    _checks.per_example("policy_rejected_logps", policy_rejected_logps, policy_chosen_logps)
    if policy_chosen_logps.numel() == 0:
        _checks.fail("policy_chosen_logps", "is empty: a preference loss needs at least one pair")
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        _checks.fail("ref_chosen_logps", "and `ref_rejected_logps` must be given together")
    if ref_chosen_logps is None and reference == "required":
        _checks.fail("ref_chosen_logps", "is required by this loss (reference log-probs of the chosen responses)")
    if ref_chosen_logps is not None:
        _checks.per_example("ref_chosen_logps", ref_chosen_logps, policy_chosen_logps)
        _checks.per_example("ref_rejected_logps", ref_rejected_logps, policy_chosen_logps)


def logratios(policy: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    """``log pi(y) - log pi_ref(y)``; the policy log-prob alone when there is no reference."""
    return policy if ref is None else policy - ref


def smoothed_logistic(u: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """``-(1-eps) log sigma(u) - eps log sigma(-u)``: the (conservative / cDPO) logistic loss."""
    loss = -F.logsigmoid(u)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-u)
    return loss


def check_positive(name: str, value) -> None:
    if isinstance(value, torch.Tensor):
        return
    if not value > 0:
        _checks.fail(name, f"must be positive, got {value!r}")


def check_label_smoothing(value: float, *, upper: float = 1.0, lower_open: bool = False) -> None:
    ok = (value > 0 if lower_open else value >= 0) and value < upper
    if not ok:
        lo = "(0" if lower_open else "[0"
        _checks.fail("label_smoothing", f"must be in {lo}, {upper}), got {value!r}")


def detached(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(x.detach() for x in xs)
