"""What level 1 must compute for one call of a loss: one pure decision, shared by every caller.

:func:`resolve_needs` takes the loss (its :class:`~fastpref.losses.LossSpec`), its hyperparameters
and what the caller provides (precomputed reference log-probs, precomputed reference entropies, a
reference head) and returns a :class:`Needs`: where the reference log-probs and entropies come
from, whether the per-token KL is needed, whether the reference head runs at all, whether the
policy's own entropy must stand in for the reference's, and which of the provided inputs the loss
will not use. Missing required inputs are refused here. :func:`fastpref.preference_loss`, the
trainer integrations and the legacy TRL mixin all call it, so they cannot disagree.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from . import _checks
from .losses.registry import LossSpec


@dataclass(frozen=True)
class Needs:
    """The plan of one call (see :func:`resolve_needs`).

    Attributes:
        reference_free: the resolved ``reference_free`` of an "optional"-reference loss (MallowsPO);
            None for the others.
        ref_logps: where the reference log-probs come from: ``"precomputed"``, ``"head"`` (the
            reference head in the fused pass), or None (the loss does not use them).
        ref_entropy: where MallowsPO's reference entropies come from: ``"precomputed"``, ``"head"``,
            ``"policy"`` (the policy's detached entropy stands in: no reference at all), or None (not
            used, including when ``neg_log_dispersion`` is given).
        kl: the per-token ``KL(p_ref || p)`` is needed (TDPO).
        run_ref_head: level 1 must run the reference head.
        policy_entropy: level 1 must produce the policy entropy as the reference stand-in.
        unused: provided inputs the loss will not use, among ``"ref_logps"``, ``"ref_entropy"``,
            ``"ref_head"`` (see :func:`warn_unused`).
        nll: the loss's NLL term is on (CPO ``cpo_alpha``, ORPO ``nll_weight``, SimPO ``sft_weight``).
    """

    reference_free: bool | None
    ref_logps: str | None
    ref_entropy: str | None
    kl: bool
    run_ref_head: bool
    policy_entropy: bool
    unused: tuple[str, ...]
    nll: bool = False


def resolve_needs(spec: LossSpec, hparams: Mapping, *, ref_logps: bool, ref_entropy: bool, ref_head: bool,
                  nll_labels: bool = False) -> Needs:
    """The :class:`Needs` of loss ``spec`` with ``hparams``, given what the caller provides.

    Args:
        spec: the loss (:func:`fastpref.get_loss`).
        hparams: its hyperparameters (``reference_free``, ``neg_log_dispersion``, NLL weights are read).
        ref_logps: precomputed reference log-probs are provided (they take precedence over the head).
        ref_entropy: precomputed reference entropies are provided.
        ref_head: a reference head (hidden states and weight) is available or obtainable.
        nll_labels: a separate target for the NLL term is provided (refused if the loss has no NLL term on).

    Raises ``ValueError`` when the loss needs an input that is not provided.
    """
    if spec.kl and not ref_head:
        _checks.fail("ref_hidden", f"is required: loss {spec.name!r} needs the reference distribution (per-token KL)")
    reference_free = spec.reference_free(hparams)
    logps_from = None
    if spec.uses_reference(hparams):
        if ref_logps:
            logps_from = "precomputed"
        elif ref_head:
            logps_from = "head"
        else:
            name = "ref_chosen_logps" if spec.layout == "pairs" else "ref_logps"
            _checks.fail(name, f"(or `ref_hidden`) is required: loss {spec.name!r} uses reference log-probs")
    entropy_from = None
    if spec.ref_entropy and hparams.get("neg_log_dispersion") is None:
        entropy_from = "precomputed" if ref_entropy else "head" if ref_head else "policy"
    run_ref_head = ref_head and (logps_from == "head" or spec.kl or entropy_from == "head")
    unused = []
    if ref_logps and logps_from is None:
        unused.append("ref_logps")
    if ref_entropy and entropy_from != "precomputed":
        unused.append("ref_entropy")
    if ref_head and not run_ref_head:
        unused.append("ref_head")
    nll = spec.uses_nll(hparams)
    if nll_labels and not nll:
        why = (f"its NLL term is off ({spec.nll_weight}=0)" if spec.nll_weight
               else "it has no NLL term (only cpo, orpo and simpo with sft_weight > 0 do)")
        _checks.fail("nll_labels", f"is not used by loss {spec.name!r}: {why}")
    return Needs(reference_free=reference_free, ref_logps=logps_from, ref_entropy=entropy_from, kl=spec.kl,
                 run_ref_head=run_ref_head, policy_entropy=entropy_from == "policy", unused=tuple(unused), nll=nll)


def unused_message(spec: LossSpec, needs: Needs, what: str, given: str) -> str:
    """Why the provided input ``what`` (in ``needs.unused``) is not used; ``given`` is how the caller names it."""
    if what == "ref_logps":
        if needs.reference_free:
            return (f"fastpref: loss {spec.name!r} runs reference-free (reference_free=True), so {given} are not "
                    "used; pass reference_free=False to use them")
        return f"fastpref: loss {spec.name!r} uses no reference log-probs, so {given} are not used"
    if what == "ref_entropy":
        if spec.ref_entropy:
            return f"fastpref: `neg_log_dispersion` is given to loss {spec.name!r}, so {given} are not used"
        return f"fastpref: loss {spec.name!r} uses no reference entropies, so {given} are not used"
    if needs.ref_logps == "precomputed":
        reason = "the precomputed reference log-probs take precedence"
    elif needs.reference_free:
        reason = "it runs reference-free; pass reference_free=False to use the reference"
    elif needs.ref_entropy == "precomputed" or spec.ref_entropy:
        reason = "its reference entropies are precomputed or replaced by `neg_log_dispersion`"
    else:
        reason = "it uses no reference model"
    return f"fastpref: loss {spec.name!r} needs nothing from the reference head ({reason}), so {given} is not run"


def warn_unused(spec: LossSpec, needs: Needs, given: Mapping[str, str], *, stacklevel: int = 3) -> None:
    """One ``UserWarning`` per unused input (Python shows each message once per call site).

    ``given`` maps the entries of ``needs.unused`` to the caller's names for them, e.g.
    ``{"ref_head": "`ref_hidden`"}``.
    """
    for what in needs.unused:
        warnings.warn(unused_message(spec, needs, what, given[what]), UserWarning, stacklevel=stacklevel)
