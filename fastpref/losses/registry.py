"""The loss registry: a name -> how to run the loss on fused per-sequence statistics.

Each entry says what level 1 must produce for the loss (scalar reference log-probs? reference
entropy? per-token KL against the reference head?) and how the rows are grouped (its layout), so the
fused front door computes only that, and holds a short adapter from the layout's batch to the loss
function. Adapters live next to their loss functions (``@register`` in each loss module).

Layouts (how the sequences of one batch map to examples):

* ``"pairs"``: ``[chosen_1..chosen_B ; rejected_1..rejected_B]`` -> :class:`PairBatch`, adapters return
  :class:`LossResult` (per-pair losses and rewards);
* ``"groups"``: K responses per prompt, stored contiguously, ``group_sizes [B]``, best first or with
  ``scores`` -> :class:`GroupBatch` (``[B, K]`` tensors and a mask), adapters return
  :class:`ListLossResult` (per-prompt losses, per-response rewards);
* ``"unpaired"``: single responses labelled desirable / undesirable, optionally followed by KTO's
  mismatched KL rows -> :class:`UnpairedBatch`, adapters return :class:`LossResult` (per-example
  losses; rewards of the desirable and of the undesirable examples).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .. import _checks
from ..segments import SequenceStats


LAYOUTS = ("pairs", "groups", "unpaired")


class LossResult(NamedTuple):
    """Unreduced per-example losses, detached per-example rewards, and loss-specific metrics."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor] = {}


class ListLossResult(NamedTuple):
    """Unreduced per-prompt losses ``[B]``, detached per-response rewards ``[B, K]``, loss-specific metrics."""

    losses: torch.Tensor
    rewards: torch.Tensor
    metrics: dict[str, torch.Tensor] = {}


@dataclass
class PairBatch:
    """Per-sequence statistics of a ``[chosen; rejected]`` batch, split into halves, for the adapters.

    Reference log-probs and entropies are stored SUMMED per sequence (TRL's precompute convention);
    the accessors derive per-token means from the token counts.
    """

    chosen: SequenceStats
    rejected: SequenceStats
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    ref_chosen_entropy: torch.Tensor | None = None
    ref_rejected_entropy: torch.Tensor | None = None
    vocab_size: int = 0
    extras: dict = field(default_factory=dict)

    def inputs(self, mean: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(policy_chosen, policy_rejected, ref_chosen, ref_rejected)`` log-probs, summed or per-token mean."""
        return (*self.logps(mean), *self.ref_logps(mean))

    def logps(self, mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if mean:
            return self.chosen.mean_logp, self.rejected.mean_logp
        return self.chosen.sum_logp, self.rejected.sum_logp

    def ref_logps(self, mean: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.ref_chosen_logps is None:
            return None, None
        if mean:
            return (self.ref_chosen_logps / self.chosen.num_tokens, self.ref_rejected_logps / self.rejected.num_tokens)
        return self.ref_chosen_logps, self.ref_rejected_logps

    def ref_entropy(self, mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if mean:
            return (self.ref_chosen_entropy / self.chosen.num_tokens, self.ref_rejected_entropy / self.rejected.num_tokens)
        return self.ref_chosen_entropy, self.ref_rejected_entropy

    @property
    def num_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.chosen.num_tokens, self.rejected.num_tokens

    @property
    def chosen_nll(self) -> torch.Tensor:
        """Token-mean negative log-likelihood of the chosen responses over the batch (TRL's NLL term)."""
        return -self.chosen.sum_logp.sum() / self.chosen.num_tokens.sum()


@dataclass
class GroupBatch:
    """Per-sequence statistics of list data as ``[B, K]`` tensors (row b: prompt b's responses).

    ``stats`` fields are padded (0 where ``mask`` is False; ``num_tokens`` 1 there). Responses are in
    the caller's order: best first, unless ``scores`` (higher is better) say otherwise. Reference
    log-probs are SUMMED per sequence.
    """

    stats: SequenceStats
    mask: torch.Tensor
    ref_sum_logps: torch.Tensor | None = None
    scores: torch.Tensor | None = None

    def logps(self, mean: bool) -> torch.Tensor:
        return self.stats.mean_logp if mean else self.stats.sum_logp

    def ref_logps(self, mean: bool) -> torch.Tensor | None:
        if self.ref_sum_logps is None or not mean:
            return self.ref_sum_logps
        return self.ref_sum_logps / self.stats.num_tokens


@dataclass
class UnpairedBatch:
    """Single responses with a desirable / undesirable label (KTO), and KTO's mismatched KL rows.

    ``stats`` covers the ``n`` examples; ``kl_logps`` / ``ref_kl_logps`` are the SUMMED policy
    (detached) and reference log-probs of the mismatched (prompt, completion) rows (None without them).
    """

    stats: SequenceStats
    desirable: torch.Tensor
    ref_sum_logps: torch.Tensor | None = None
    kl_logps: torch.Tensor | None = None
    ref_kl_logps: torch.Tensor | None = None


@dataclass(frozen=True)
class LossSpec:
    """What the fused front door needs to know to run a loss by name."""

    name: str
    compute: Callable[..., LossResult]  # (batch, **hparams) -> LossResult
    # Scalar reference log-probs: "required", "none", or "optional" (used unless the hyperparameter
    # ``reference_free`` is True; its default is ``reference_free_default``).
    reference: str = "none"
    reference_free_default: bool = True
    ref_entropy: bool = False  # reference next-token entropy (MallowsPO's dispersion)
    kl: bool = False  # per-token KL(p_ref || p) from the reference head (TDPO)
    layout: str = "pairs"  # how rows are grouped: one of LAYOUTS
    token_weights: bool = False  # accepts per-token logp_weights / kl_weights (SparsePO-style masks)
    summary: str = ""

    def uses_reference(self, hparams: dict) -> bool:
        if self.reference == "optional":
            return not hparams.get("reference_free", self.reference_free_default)
        return self.reference == "required"


LOSSES: dict[str, LossSpec] = {}


def register(name: str, **spec) -> Callable:
    """Decorator: register ``compute(batch, **hparams)`` under ``name`` (``spec``: :class:`LossSpec` fields)."""

    def wrap(compute: Callable) -> Callable:
        if name in LOSSES:
            raise RuntimeError(f"loss {name!r} registered twice")
        if spec.get("layout", "pairs") not in LAYOUTS:
            raise RuntimeError(f"loss {name!r}: layout must be one of {LAYOUTS}, got {spec['layout']!r}")
        summary = (compute.__doc__ or "").strip().splitlines()[0] if compute.__doc__ else ""
        LOSSES[name] = LossSpec(name=name, compute=compute, summary=summary, **spec)
        return compute

    return wrap


def get_loss(name: str) -> LossSpec:
    """The :class:`LossSpec` registered under ``name`` (``ValueError`` listing the names otherwise)."""
    if name not in LOSSES:
        _checks.fail("loss", f"must be one of {sorted(LOSSES)}, got {name!r}")
    return LOSSES[name]


def available_losses() -> list[str]:
    """Names accepted by :func:`fastpref.preference_loss` and :class:`fastpref.PreferenceLoss`."""
    return sorted(LOSSES)
