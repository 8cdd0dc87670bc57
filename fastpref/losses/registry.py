"""The loss registry: a name -> how to run the loss on fused per-sequence statistics.

Each entry (:class:`LossSpec`) says what level 1 must produce for the loss (scalar reference
log-probs? reference entropy? per-token KL against the reference head?), how the rows are grouped
(its layout, :mod:`fastpref.layouts`), which hyperparameters it accepts, and holds a short adapter
from the layout's batch to the functional loss. Adapters live next to their loss functions
(``@register`` in each loss module); what level 1 runs for a call is decided by
:func:`fastpref.needs.resolve_needs`.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .. import _checks
from ..layouts import (  # noqa: F401  (the layout names and the adapters' batch and result types, re-exported)
    LAYOUTS,
    GroupBatch,
    ListLossResult,
    LossResult,
    PairBatch,
    UnpairedBatch,
)

# Accepted by every pairwise loss through the front door: WPO's weighting (see LossSpec.use_weighting).
PAIR_OPTIONS = ("use_weighting",)
# Arguments every adapter passes to its functional loss itself (never hyperparameters).
ADAPTER_ARGUMENTS = ("reduction",)
# DPO loss types that sort the batch's log-ratios: their losses belong to sorted positions, not to pairs.
BATCH_SORTED_LOSS_TYPES = ("aot", "aot_unpaired")


def batch_sorted(loss_type) -> list[str]:
    """The loss types of ``loss_type`` (a name or a list) without per-pair losses (:data:`BATCH_SORTED_LOSS_TYPES`)."""
    names = [loss_type] if isinstance(loss_type, str) else loss_type if isinstance(loss_type, (list, tuple)) else ()
    return [name for name in names if name in BATCH_SORTED_LOSS_TYPES]


@dataclass(frozen=True)
class LossSpec:
    """What the fused front door needs to know to run a loss by name."""

    name: str
    compute: Callable  # (batch, **hparams) -> LossResult / ListLossResult
    function: Callable | None = None  # the functional loss the adapter calls (fastpref.<name>_loss)
    hyperparameters: tuple[str, ...] = ()  # accepted keyword names, sorted (see check_hparams)
    # Scalar reference log-probs: "required", "none", or "optional" (used unless the hyperparameter
    # ``reference_free`` is True; its default is ``reference_free_default``).
    reference: str = "none"
    reference_free_default: bool = True
    ref_entropy: bool = False  # reference next-token entropy (MallowsPO's dispersion)
    kl: bool = False  # per-token KL(p_ref || p) from the reference head (TDPO)
    layout: str = "pairs"  # how rows are grouped: one of fastpref.layouts.LAYOUTS
    token_weights: bool = False  # accepts per-token logp_weights / kl_weights (SparsePO-style masks)
    nll_weight: str | None = None  # the hyperparameter weighting the loss's NLL term (None: no NLL term)

    def check_hparams(self, hparams: Mapping) -> None:
        """``ValueError`` for a name the loss does not accept (listing those it does), or a bad front-door option.

        Names only for the loss's own hyperparameters (their values are checked by the loss function
        when it runs); ``use_weighting`` and ``reference_free``, read before the fused pass, are
        checked here too.
        """
        self.use_weighting(hparams)  # first: its own message for the losses WPO cannot weight
        for key in hparams:
            if key not in self.hyperparameters and key != "use_weighting":
                close = difflib.get_close_matches(key, self.hyperparameters, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                _checks.fail(key, f"is not a hyperparameter of loss {self.name!r}{hint}; it accepts: "
                                  f"{', '.join(self.hyperparameters) or 'none'}")
        self.reference_free(hparams)

    def reference_free(self, hparams: Mapping) -> bool | None:
        """The resolved ``reference_free`` of an "optional"-reference loss (None for the others)."""
        if self.reference != "optional":
            return None
        return _checks.flag("reference_free", hparams.get("reference_free", self.reference_free_default))

    def uses_reference(self, hparams: Mapping) -> bool:
        """Whether the loss uses reference log-probs with these hyperparameters."""
        if self.reference == "optional":
            return not self.reference_free(hparams)
        return self.reference == "required"

    def uses_nll(self, hparams: Mapping) -> bool:
        """Whether the loss's NLL term is on (its weight, e.g. ``cpo_alpha``, is nonzero)."""
        return self.nll_weight is not None and bool(hyperparameter(self.function, self.nll_weight, hparams))

    def use_weighting(self, hparams: Mapping) -> bool:
        """WPO's ``use_weighting``: pairwise losses only, and not the batch-sorting AOT losses."""
        if not _checks.flag("use_weighting", hparams.get("use_weighting", False)):
            return False
        if self.layout != "pairs":
            _checks.fail("use_weighting", f"(WPO) weights preference pairs; loss {self.name!r} takes {self.layout!r}")
        if batch_sorted(hparams.get("loss_type")):
            _checks.fail("use_weighting", "cannot weight 'aot'/'aot_unpaired': they sort the batch, misaligning pairs")
        return True

    def check_reduction(self, hparams: Mapping, reduction: str) -> None:
        """``reduction="none"`` needs one loss per example: refused for the batch-sorting AOT loss types."""
        _checks.check_reduction(reduction)
        if reduction == "none" and batch_sorted(hparams.get("loss_type")):
            _checks.fail("reduction", "='none' has no per-pair losses with loss_type 'aot'/'aot_unpaired' (they sort "
                                      "the batch's log-ratios); use 'mean' or 'sum'")


def hyperparameter(function: Callable, name: str, hparams: Mapping):
    """The value of hyperparameter ``name``: as given in ``hparams``, else the default of ``function``."""
    return hparams.get(name, inspect.signature(function).parameters[name].default)


LOSSES: dict[str, LossSpec] = {}


def register(name: str, *, function: Callable, provided: tuple[str, ...] = (), options: tuple[str, ...] = (),
             **spec) -> Callable:
    """Decorator: register ``compute(batch, **hparams)`` under ``name``.

    ``function`` is the functional loss the adapter calls: its keyword-only parameters are the
    loss's hyperparameters, except ``provided`` (what the adapter passes itself, e.g. ``mask``,
    ``policy_nll_loss``) and ``reduction``; ``options`` are the adapter's own extra ones (e.g.
    MallowsPO's ``length_normalization``). ``spec``: the other :class:`LossSpec` fields.
    """

    def wrap(compute: Callable) -> Callable:
        if name in LOSSES:
            raise RuntimeError(f"loss {name!r} registered twice")
        if spec.get("layout", "pairs") not in LAYOUTS:
            raise RuntimeError(f"loss {name!r}: layout must be one of {LAYOUTS}, got {spec['layout']!r}")
        skip = set(provided) | set(ADAPTER_ARGUMENTS)
        keywords = [p.name for p in inspect.signature(function).parameters.values()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in skip]
        extra = set(options) | (set(PAIR_OPTIONS) if spec.get("layout", "pairs") == "pairs" else set())
        accepted = tuple(sorted(set(keywords) | extra))
        LOSSES[name] = LossSpec(name=name, compute=compute, function=function, hyperparameters=accepted, **spec)
        return compute

    return wrap


def get_loss(name: str) -> LossSpec:
    """The :class:`LossSpec` registered under ``name`` (``ValueError`` listing the names otherwise)."""
    if not isinstance(name, str) or name not in LOSSES:
        _checks.fail("loss", f"must be one of {sorted(LOSSES)}, got {name!r}")
    return LOSSES[name]


def available_losses() -> list[str]:
    """Names accepted by :func:`fastpref.preference_loss` and :class:`fastpref.PreferenceLoss`."""
    return sorted(LOSSES)
