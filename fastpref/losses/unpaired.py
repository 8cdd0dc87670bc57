"""KTO (Ethayarajh et al., 2024): unpaired desirable / undesirable responses, as TRL's ``KTOTrainer``.

Each example is one (prompt, response) with a label; the reference point ``z`` is a detached batch
estimate of ``KL(pi || pi_ref)`` from MISMATCHED (prompt, completion) rows: TRL cycles the batch's
completions by one so every prompt is paired with another example's completion.

Through the fused front door (``layout="unpaired"``) the rows are ``[examples ; KL rows]``: the first
``n`` sequences are the examples, labelled by ``desirable [n]``, and the last ``num_kl_rows`` are the
mismatched rows (their hidden states from the same model forward on the mismatched inputs,
concatenated along the batch). The KL rows only feed ``z``: the front door runs them through level 1
without gradient (no backward GEMMs), so they may come from a ``torch.no_grad()`` forward.
"""

from __future__ import annotations

import torch

from .. import _checks
from ._common import reduce
from .checks import as_bool_labels, check_choice, check_non_negative, check_positive
from .registry import LossResult, UnpairedBatch, register

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z = max(0, mean(log pi(y'|x) - log pi_ref(y'|x)))`` over mismatched rows, detached.

    SUMMED log-probs. Under data parallelism TRL averages the per-rank means before the clamp: pass
    that all-reduced mean as ``kl`` to :func:`kto_loss` instead.
    """
    _checks.per_example("policy_kl_logps", policy_kl_logps)
    _checks.per_example("ref_kl_logps", ref_kl_logps, policy_kl_logps, like_name="policy_kl_logps")
    if policy_kl_logps.numel() == 0:
        _checks.fail("policy_kl_logps", "is empty: the KL estimate needs at least one mismatched row")
    return (policy_kl_logps.detach() - ref_kl_logps.detach()).mean().clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    kl: torch.Tensor | float | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Kahneman-Tversky Optimisation on per-example SUMMED log-probs, ``rho = log pi(y) - log pi_ref(y)``::

        desirable:    desirable_weight   * (1 - sigma(beta (rho - z)))
        undesirable:  undesirable_weight * (1 - sigma(beta (z - rho)))

    ``z = kl`` (one number or a one-element tensor for the batch, see :func:`kto_kl_estimate`; detached),
    required by ``loss_type="kto"``.
    ``loss_type="apo_zero_unpaired"``: ``1 - sigma(beta rho)`` / ``sigma(beta rho)``, no ``z``.
    ``desirable [n]`` is bool (or 0/1 integers). The mean over all examples is TRL's ``losses.nanmean()``;
    ``reduction="none"`` keeps the input order. Defaults are TRL's.

    Returns ``(losses, rewards)`` with per-example rewards ``beta * rho`` (detached).
    """
    _checks.per_example("policy_logps", policy_logps)
    _checks.per_example("ref_logps", ref_logps, policy_logps, like_name="policy_logps")
    _checks.tensor("desirable", desirable, ndim=1)
    if desirable.shape != policy_logps.shape:
        _checks.fail("desirable", f"has shape {tuple(desirable.shape)} but `policy_logps` has "
                                  f"{tuple(policy_logps.shape)}")
    _checks.same_device("desirable", desirable, "policy_logps", policy_logps)
    if policy_logps.numel() == 0:
        _checks.fail("policy_logps", "is empty: KTO needs at least one example")
    desirable = as_bool_labels("desirable", desirable)
    check_positive("beta", beta, like=policy_logps)
    check_non_negative("desirable_weight", desirable_weight, like=policy_logps)
    check_non_negative("undesirable_weight", undesirable_weight, like=policy_logps)
    check_choice("loss_type", loss_type, KTO_LOSS_TYPES)
    rho = policy_logps - ref_logps
    if loss_type == "kto":
        if kl is None:
            _checks.fail("kl", "is required by loss_type 'kto': the reference point z (see kto_kl_estimate)")
        check_non_negative("kl", kl)  # z = max(0, KL estimate)
        if isinstance(kl, torch.Tensor) and kl.numel() != 1:  # per-example values would each shift their own rho
            _checks.fail("kl", f"is the batch's reference point z, one value; got shape {tuple(kl.shape)}")
        z = torch.as_tensor(kl, dtype=rho.dtype, device=rho.device).detach().reshape(())
        chosen, rejected = 1 - torch.sigmoid(beta * (rho - z)), 1 - torch.sigmoid(beta * (z - rho))
    else:
        if kl is not None:
            _checks.fail("kl", "is not used by loss_type 'apo_zero_unpaired' (it has no reference point)")
        chosen, rejected = 1 - torch.sigmoid(beta * rho), torch.sigmoid(beta * rho)
    losses = torch.where(desirable, desirable_weight * chosen, undesirable_weight * rejected)
    return reduce(losses, reduction), (beta * rho).detach()


# ---- fused front-door adapter (see fastpref.losses.registry) ----


@register("kto", function=kto_loss, reference="required", layout="unpaired")
def _kto_from_batch(batch: UnpairedBatch, **hparams) -> LossResult:
    """KTO: unpaired desirable/undesirable responses against the mismatched-pair KL reference point."""
    kl = hparams.pop("kl", None)
    uses_z = hparams.get("loss_type", "kto") == "kto"
    if batch.kl_logps is not None and (kl is not None or not uses_z):
        why = "the reference point `kl` is given" if kl is not None else "loss_type 'apo_zero_unpaired' has no z"
        _checks.fail("num_kl_rows", f"> 0, but the KL rows would not be used: {why}")
    if kl is None and uses_z:
        if batch.kl_logps is None:
            _checks.fail("num_kl_rows", "is 0: loss 'kto' needs mismatched KL rows after the examples "
                                        "(or a precomputed reference point `kl`)")
        kl = kto_kl_estimate(batch.kl_logps, batch.ref_kl_logps)
    losses, rewards = kto_loss(batch.stats.sum_logp, batch.ref_sum_logps, batch.desirable, kl=kl,
                               reduction="none", **hparams)
    desirable = batch.desirable.bool()
    z = torch.zeros((), device=losses.device) if kl is None else torch.as_tensor(kl, device=losses.device).reshape(())
    return LossResult(losses, rewards[desirable], rewards[~desirable], {"kl": z.detach().float()})
