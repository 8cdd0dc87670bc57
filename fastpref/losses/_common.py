"""Helpers shared by the level-3 losses: pair input checks, log-ratios, label smoothing, reductions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks
from .._checks import reduce  # noqa: F401  (re-exported for the loss modules)
from .checks import check_number


def check_pair(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    reference: str = "optional",
) -> None:
    """Validates the four per-pair log-prob tensors; ``reference`` is "required", "optional" or "none".

    ``"none"``: the loss takes no reference (its signature has no reference arguments).
    """
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


def check_num_tokens(name: str, x, like: torch.Tensor) -> None:
    """Per-pair token counts: a 1-D integer or floating tensor shaped like ``like`` (``policy_chosen_logps``),
    whole numbers >= 1 (one host synchronisation)."""
    _checks.tensor(name, x, ndim=1)
    if x.dtype == torch.bool or x.dtype.is_complex:
        _checks.fail(name, f"must hold token counts (integers), got {x.dtype}")
    if x.shape != like.shape:
        _checks.fail(name, f"has shape {tuple(x.shape)} but `policy_chosen_logps` has {tuple(like.shape)}")
    _checks.same_device(name, x, "policy_chosen_logps", like)
    bad = (x < 1) | (x != x.round()) | ~torch.isfinite(x) if x.dtype.is_floating_point else x < 1
    if bad.any():
        _checks.fail(name, f"must hold token counts (whole numbers >= 1), got {x[bad].tolist()[:8]}")


def logratios(policy: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    """``log pi(y) - log pi_ref(y)``; the policy log-prob alone when there is no reference."""
    return policy if ref is None else policy - ref


def smoothed_logistic(u: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """``-(1-eps) log sigma(u) - eps log sigma(-u)``: the (conservative / cDPO) logistic loss."""
    loss = -F.logsigmoid(u)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-u)
    return loss


def check_label_smoothing(value: float, *, upper: float = 1.0, lower_open: bool = False,
                          loss_types=None, smoothed: tuple[str, ...] = ()) -> None:
    """``label_smoothing`` in ``[0, upper)`` (``(0, upper)`` with ``lower_open``); a nonzero value with
    ``loss_types`` none of which is in ``smoothed`` would be ignored, so it is refused."""
    check_number("label_smoothing", value, low=0, low_open=lower_open, high=upper, high_open=True,
                 scalar=True)
    if value and loss_types is not None and not set(loss_types) & set(smoothed):
        _checks.fail("label_smoothing", f"={value!r} is not used by loss_type {list(loss_types)} (only by "
                                        f"{', '.join(smoothed)}); set it to 0")


def with_nll(losses: torch.Tensor, weight_name: str, weight: float, nll: torch.Tensor | None) -> torch.Tensor:
    """``losses + weight * nll``; a nonzero ``weight`` without ``nll``, or an ``nll`` with ``weight`` 0, is
    refused: the term is never dropped silently."""
    if not weight:
        if nll is not None:
            _checks.fail("policy_nll_loss", f"is given but {weight_name}={weight!r} leaves the NLL term out; set "
                                            f"{weight_name} > 0 to add it, or do not pass it")
        return losses
    if nll is None:
        _checks.fail("policy_nll_loss", f"is required with {weight_name}={weight!r} (the NLL term); pass the "
                                        f"token-mean NLL of the chosen responses, or {weight_name}=0 to leave it out")
    _checks.tensor("policy_nll_loss", nll, ndim=0)
    return losses + weight * nll


def detached(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(x.detach() for x in xs)
