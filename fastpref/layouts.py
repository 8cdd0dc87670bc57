"""Layouts: how the sequences of one batch form examples — pairs, groups (K responses per prompt), unpaired.

A layout owns everything that depends on that grouping: its per-batch arguments and their checks,
the batch its loss adapters receive (:class:`PairBatch`, :class:`GroupBatch`, :class:`UnpairedBatch`)
and the result they return (:class:`LossResult`, :class:`ListLossResult`), which rows are "chosen" and
"rejected" (the best response of a group; the desirable / undesirable examples), per-row rewards, the
token counts that weight TRL's token metrics, and the TRL-named metrics themselves. A new layout is one
:class:`Layout` subclass added to :data:`LAYOUT_CLASSES` (and its arguments to :func:`fastpref.preference_loss`'s
signature, where users see them).

* ``"pairs"``: ``[chosen_1..chosen_B ; rejected_1..rejected_B]``;
* ``"groups"``: each prompt's K >= 2 responses stored contiguously, ``group_sizes [B]``, best first or
  ranked by ``scores [S]`` (higher is better);
* ``"unpaired"``: ``[examples ; KL rows]``, ``desirable [n]`` labels the examples, ``num_kl_rows``
  mismatched (prompt, completion) rows follow for KTO's reference point (run without gradient).

Which sequences there are — one per row (padded) or several per row (packed, ``cu_seqlens`` /
``seq_ids``) — is the packing (:class:`fastpref.segments.Segments`), independent of the layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from . import _checks
from .losses.lists import best_index, list_metrics
from .losses.checks import as_bool_labels
from .losses.wpo import wpo_weights
from .ops import TokenStats
from .segments import Groups, Segments, SequenceStats, map_stats

# Which rows weight each token-level metric (TRL logs token means): the scored rows, the chosen, the rejected.
TOKEN_METRIC_ROWS = {
    "entropy": "all", "logits/chosen": "chosen", "logits/rejected": "rejected", "mean_token_accuracy": "chosen",
}


# ---- what adapters receive and return ----


class LossResult(NamedTuple):
    """Unreduced per-example losses, detached rewards of the chosen / rejected rows, loss-specific metrics.

    Pairs: per-pair losses ``[B]`` and rewards ``[B]`` each. Unpaired: per-example losses ``[n]``,
    rewards of the desirable and of the undesirable examples (in row order).
    """

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
    the accessors derive per-token means from the token counts. ``nll_loss``: the NLL term's value
    when it has its own target (``nll_labels`` of the front door); otherwise :attr:`chosen_nll`
    derives it from the chosen log-probs.
    """

    chosen: SequenceStats
    rejected: SequenceStats
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    ref_chosen_entropy: torch.Tensor | None = None
    ref_rejected_entropy: torch.Tensor | None = None
    vocab_size: int = 0
    nll_loss: torch.Tensor | None = None

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
            return (self.ref_chosen_entropy / self.chosen.num_tokens,
                    self.ref_rejected_entropy / self.rejected.num_tokens)
        return self.ref_chosen_entropy, self.ref_rejected_entropy

    @property
    def num_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.chosen.num_tokens, self.rejected.num_tokens

    @property
    def chosen_nll(self) -> torch.Tensor:
        """Token-mean negative log-likelihood of the chosen responses over the batch (TRL's NLL term)."""
        if self.nll_loss is not None:
            return self.nll_loss
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


# ---- shared pieces ----


def token_counts(num_tokens: torch.Tensor, chosen_rows: torch.Tensor, rejected_rows: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
    """Valid tokens of the scored rows (``"all"``: chosen or rejected; KTO's KL rows are neither), of the
    chosen and of the rejected rows: the weights of the token metrics (:data:`TOKEN_METRIC_ROWS`)."""
    n = num_tokens.to(torch.int64)
    return {"all": (n * (chosen_rows | rejected_rows)).sum(), "chosen": (n * chosen_rows).sum(),
            "rejected": (n * rejected_rows).sum()}


def _precomputed(name: str, x: torch.Tensor | None, count: int, labels: torch.Tensor, what: str):
    """A precomputed per-example tensor (reference log-probs / entropies): ``[count]``, finite, as fp32, detached
    (a reference gets no gradient, as from the reference head)."""
    if x is not None:
        _checks.per_example(name, x)
        if x.shape[0] != count:
            _checks.fail(name, f"has {x.shape[0]} entries for {count} {what}")
        _checks.same_device(name, x, "labels", labels)
        if not torch.isfinite(x).all():
            _checks.fail(name, "contains NaN or Inf")
        x = x.detach().float()
    return x


def _scatter_rows(num: int, rows: torch.Tensor, values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[num]`` fp32 with ``values`` in the True positions of ``rows`` (in order), NaN elsewhere."""
    if out is None:
        out = torch.full((num,), float("nan"), device=rows.device)
    return out.masked_scatter(rows, values.detach().float().to(rows.device))


# ---- the layouts ----


class Layout:
    """Base: the sequences ``[0, S)`` of a batch and which of them are chosen / rejected.

    Subclasses set ``chosen_rows`` / ``rejected_rows`` (``[S]`` bool), may set ``ref_entropy``
    (precomputed, summed, per sequence) and ``no_grad_from`` (first sequence run without gradient),
    and implement :meth:`batch`, :meth:`metrics` and (for list results) :meth:`row_rewards`.
    ``ref_logps [S]`` (precomputed SUMMED reference log-probs, one per sequence) is common to all.
    """

    name: ClassVar[str]
    arguments: ClassVar[tuple[str, ...]] = ()  # per-batch keyword arguments of this layout only

    @staticmethod
    def examples() -> list[tuple[int, dict]]:
        """The smallest batches of this layout, ``(number of sequences, per-batch arguments)``: a loss's
        hyperparameter values are checked on them before any data (:func:`fastpref.modules.check_values`)."""
        return [(2, {})]

    def __init__(self, num: int, labels: torch.Tensor, inputs: Mapping):
        self.num = num
        self.ref_logps = _precomputed("ref_logps", inputs.get("ref_logps"), num, labels, "sequences")
        self.ref_entropy = None
        self.no_grad_from = None
        self.chosen_rows = self.rejected_rows = None

    def batch(self, seq: SequenceStats, *, ref_logps: torch.Tensor | None, ref_entropy: torch.Tensor | None,
              vocab_size: int, nll_loss: torch.Tensor | None = None):
        raise NotImplementedError

    def metrics(self, result, batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def row_rewards(self, result) -> torch.Tensor:
        """``[S]`` detached rewards in row order (NaN on rows without one, e.g. KTO's KL rows)."""
        out = _scatter_rows(self.num, self.chosen_rows, result.chosen_rewards)
        return _scatter_rows(self.num, self.rejected_rows, result.rejected_rewards, out)

    def token_metrics(self, stats: TokenStats, segments: Segments) -> dict[str, torch.Tensor]:
        """TRL's token metrics: policy entropy, mean logits of chosen / rejected, chosen top-1 accuracy."""
        counts = token_counts(segments.num_tokens, self.chosen_rows, self.rejected_rows)
        rows = {"all": self.chosen_rows | self.rejected_rows, "chosen": self.chosen_rows,
                "rejected": self.rejected_rows}
        values = {"entropy": stats.entropy, "logits/chosen": stats.mean_logits,
                  "logits/rejected": stats.mean_logits, "mean_token_accuracy": stats.is_top1}
        return {
            name: (segments.sum(values[name].detach().float()) * rows[which]).sum() / counts[which].clamp(min=1)
            for name, which in TOKEN_METRIC_ROWS.items()
        }


class PairLayout(Layout):
    """``[chosen_1..chosen_B ; rejected_1..rejected_B]``."""

    name = "pairs"
    arguments = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_entropy", "ref_rejected_entropy")

    def __init__(self, num: int, labels: torch.Tensor, inputs: Mapping):
        if num % 2:
            _checks.fail("labels", f"holds {num} sequences; pairs need an even number ([chosen; rejected])")
        super().__init__(num, labels, inputs)
        self.pairs = pairs = num // 2
        ref_chosen = _precomputed("ref_chosen_logps", inputs.get("ref_chosen_logps"), pairs, labels, "pairs")
        ref_rejected = _precomputed("ref_rejected_logps", inputs.get("ref_rejected_logps"), pairs, labels, "pairs")
        chosen_h = _precomputed("ref_chosen_entropy", inputs.get("ref_chosen_entropy"), pairs, labels, "pairs")
        rejected_h = _precomputed("ref_rejected_entropy", inputs.get("ref_rejected_entropy"), pairs, labels, "pairs")
        if (ref_chosen is None) != (ref_rejected is None):
            _checks.fail("ref_chosen_logps", "and `ref_rejected_logps` must be given together")
        if (chosen_h is None) != (rejected_h is None):
            _checks.fail("ref_chosen_entropy", "and `ref_rejected_entropy` must be given together")
        if ref_chosen is not None:
            if self.ref_logps is not None:
                _checks.fail("ref_logps", "and `ref_chosen_logps`/`ref_rejected_logps` are alternatives; pass one")
            self.ref_logps = torch.cat([ref_chosen, ref_rejected])
        self.ref_entropy = None if chosen_h is None else torch.cat([chosen_h, rejected_h])
        arange = torch.arange(num, device=labels.device)
        self.chosen_rows, self.rejected_rows = arange < pairs, arange >= pairs

    def batch(self, seq, *, ref_logps, ref_entropy, vocab_size, nll_loss=None) -> PairBatch:
        n = self.pairs
        chosen, rejected = map_stats(seq, lambda x: x[:n]), map_stats(seq, lambda x: x[n:])
        return PairBatch(
            chosen=chosen, rejected=rejected,
            ref_chosen_logps=None if ref_logps is None else ref_logps[:n],
            ref_rejected_logps=None if ref_logps is None else ref_logps[n:],
            ref_chosen_entropy=None if ref_entropy is None else ref_entropy[:n],
            ref_rejected_entropy=None if ref_entropy is None else ref_entropy[n:],
            vocab_size=vocab_size, nll_loss=nll_loss,
        )

    def wpo(self, seq: SequenceStats) -> torch.Tensor:
        """WPO's ``w(y_w) w(y_l)`` per pair (detached)."""
        w = wpo_weights(seq.mean_logp, seq.mean_log_sum_sq_probs)
        return w[: self.pairs] * w[self.pairs:]

    def metrics(self, result: LossResult, batch: PairBatch) -> dict[str, torch.Tensor]:
        cr, rr = result.chosen_rewards.float(), result.rejected_rewards.float()
        return {
            "rewards/chosen": cr.mean(),
            "rewards/rejected": rr.mean(),
            "rewards/accuracies": (cr > rr).float().mean(),
            "rewards/margins": (cr - rr).mean(),
            "logps/chosen": batch.chosen.sum_logp.detach().mean(),
            "logps/rejected": batch.rejected.sum_logp.detach().mean(),
        }


class GroupLayout(Layout):
    """K responses per prompt, stored contiguously: ``group_sizes [B]``, best first or ``scores [S]``.

    The best response of each prompt (highest score, first among ties) is its "chosen" row.
    """

    name = "groups"
    arguments = ("group_sizes", "scores")

    @staticmethod
    def examples() -> list[tuple[int, dict]]:
        return [(2, {"group_sizes": [2], "scores": torch.tensor([1.0, 0.0])})]

    def __init__(self, num: int, labels: torch.Tensor, inputs: Mapping):
        super().__init__(num, labels, inputs)
        if inputs.get("group_sizes") is None:
            _checks.fail("group_sizes", "is required by list losses: the number of responses of each prompt")
        self.groups = groups = Groups(inputs["group_sizes"], num, device=labels.device)
        scores = inputs.get("scores")
        if scores is not None:
            _checks.per_example("scores", scores)
            if scores.shape[0] != num:
                _checks.fail("scores", f"has {scores.shape[0]} entries for {num} sequences (one score per response)")
            _checks.same_device("scores", scores, "labels", labels)
            if not torch.isfinite(scores).all():
                _checks.fail("scores", "contains NaN or Inf")
            scores = groups.pad(scores.float())
        self.scores = scores
        best = groups.index.gather(1, best_index(groups.mask, scores)[:, None])[:, 0]
        self.chosen_rows = torch.zeros(num, dtype=torch.bool, device=labels.device).index_fill(0, best, True)
        self.rejected_rows = ~self.chosen_rows
        # positions of the S sequences in the flattened [B, K] padding, from the sizes (no host sync)
        k = groups.max_size
        flat = [b * k + i for b, size in enumerate(groups.sizes) for i in range(size)]
        self.flat_index = torch.tensor(flat, device=labels.device)

    def batch(self, seq, *, ref_logps, ref_entropy, vocab_size, nll_loss=None) -> GroupBatch:
        groups = self.groups
        return GroupBatch(stats=groups.pad_stats(seq), mask=groups.mask,
                          ref_sum_logps=None if ref_logps is None else groups.pad(ref_logps), scores=self.scores)

    def metrics(self, result: ListLossResult, batch: GroupBatch) -> dict[str, torch.Tensor]:
        return list_metrics(result.rewards, batch.stats.sum_logp, batch.mask, batch.scores)

    def row_rewards(self, result: ListLossResult) -> torch.Tensor:
        return result.rewards.detach().float().reshape(-1).index_select(0, self.flat_index)


class UnpairedLayout(Layout):
    """``[examples ; KL rows]``: ``desirable [n]`` labels the examples, ``num_kl_rows`` mismatched rows follow.

    The desirable examples are the "chosen" rows, the undesirable ones the "rejected"; the KL rows are
    neither and run through level 1 without gradient.
    """

    name = "unpaired"
    arguments = ("desirable", "num_kl_rows")

    @staticmethod
    def examples() -> list[tuple[int, dict]]:  # with the KL rows of loss_type 'kto', and without
        return [(4, {"desirable": torch.tensor([True, False]), "num_kl_rows": 2}),
                (2, {"desirable": torch.tensor([True, False])})]

    def __init__(self, num: int, labels: torch.Tensor, inputs: Mapping):
        super().__init__(num, labels, inputs)
        desirable, kl_rows = inputs.get("desirable"), inputs.get("num_kl_rows")
        _checks.integer("num_kl_rows", kl_rows, minimum=0, optional=True)
        kl_rows = kl_rows or 0
        if desirable is None:
            _checks.fail("desirable", "is required by unpaired losses: a bool label per example")
        _checks.tensor("desirable", desirable, ndim=1)
        _checks.same_device("desirable", desirable, "labels", labels)
        self.examples = desirable.shape[0]
        if self.examples == 0:
            _checks.fail("desirable", "is empty: an unpaired loss needs at least one example")
        if self.examples + kl_rows != num:
            _checks.fail("desirable", f"has {self.examples} entries and num_kl_rows={kl_rows}, but labels hold "
                                      f"{num} sequences (examples first, then the KL rows)")
        desirable = as_bool_labels("desirable", desirable)
        self.desirable, self.kl_rows = desirable, kl_rows
        self.num_desirable = int(desirable.sum())
        pad = torch.zeros(kl_rows, dtype=torch.bool, device=labels.device)
        self.chosen_rows = torch.cat([desirable, pad])
        self.rejected_rows = torch.cat([~desirable, pad])
        self.no_grad_from = self.examples if kl_rows else None

    def batch(self, seq, *, ref_logps, ref_entropy, vocab_size, nll_loss=None) -> UnpairedBatch:
        n = self.examples
        examples, kl = map_stats(seq, lambda x: x[:n]), map_stats(seq, lambda x: x[n:])
        has_kl = self.kl_rows > 0
        return UnpairedBatch(
            stats=examples, desirable=self.desirable, ref_sum_logps=None if ref_logps is None else ref_logps[:n],
            kl_logps=kl.sum_logp.detach() if has_kl else None,
            ref_kl_logps=None if ref_logps is None or not has_kl else ref_logps[n:],
        )

    def metrics(self, result: LossResult, batch: UnpairedBatch) -> dict[str, torch.Tensor]:
        """TRL's KTO metrics: means over the desirable / undesirable examples, when there are any."""
        logps = batch.stats.sum_logp.detach()
        metrics = {}
        if self.num_desirable:
            metrics["rewards/chosen"] = result.chosen_rewards.float().mean()
            metrics["logps/chosen"] = logps[self.desirable].mean()
        if self.num_desirable < self.examples:
            metrics["rewards/rejected"] = result.rejected_rewards.float().mean()
            metrics["logps/rejected"] = logps[~self.desirable].mean()
        if 0 < self.num_desirable < self.examples:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return metrics


LAYOUT_CLASSES: dict[str, type[Layout]] = {cls.name: cls for cls in (PairLayout, GroupLayout, UnpairedLayout)}
LAYOUTS = tuple(LAYOUT_CLASSES)  # the names: "pairs", "groups", "unpaired"
# Every per-batch layout argument (what a collator may put next to the tokens for the front door).
LAYOUT_ARGUMENTS = ("ref_logps",) + tuple(name for cls in LAYOUT_CLASSES.values() for name in cls.arguments)


def make_layout(layout: str, loss: str, num: int, labels: torch.Tensor, inputs: Mapping) -> Layout:
    """The ``layout`` object for ``num`` sequences; arguments of another layout are an error, never ignored."""
    for other, cls in LAYOUT_CLASSES.items():
        if other == layout:
            continue
        for name in cls.arguments:
            if inputs.get(name) is not None:
                _checks.fail(name, f"belongs to layout {other!r}, but loss {loss!r} takes {layout!r}")
    return LAYOUT_CLASSES[layout](num, labels, inputs)
