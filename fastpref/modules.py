"""The fused front door: hidden states + LM head -> any registered preference loss, and its nn.Module.

One path for every loss: check the layout's own arguments (:class:`_Pairs`, :class:`_Groups`,
:class:`_Unpaired`), run level 1 once for exactly what the loss needs, reduce per sequence, hand the
layout's batch to the registered adapter, and log the layout's metrics.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _checks
from .losses._lists import best_index, list_metrics
from .losses.registry import (
    GroupBatch,
    ListLossResult,
    LossResult,
    LossSpec,
    PairBatch,
    UnpairedBatch,
    get_loss,
)
from .losses.wpo import wpo_weights
from .ops import TokenStats, token_stats
from .segments import Groups, Segments, SequenceStats, _layout, _reduce, check_token_weights, map_stats


class PreferenceOutput(NamedTuple):
    """``loss`` (reduced as asked) and detached scalar ``metrics`` under TRL's names."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def _split(stats: SequenceStats, n: int) -> tuple[SequenceStats, SequenceStats]:
    """Per-sequence stats of ``[first n; rest]`` (pairs: chosen, rejected)."""
    return map_stats(stats, lambda x: x[:n]), map_stats(stats, lambda x: x[n:])


def _precomputed(name: str, x: torch.Tensor | None, count: int, labels: torch.Tensor, what: str = "pairs"):
    if x is not None:
        _checks.per_example(name, x)
        if x.shape[0] != count:
            _checks.fail(name, f"has {x.shape[0]} entries for {count} {what}")
        _checks.same_device(name, x, "labels", labels)
        if not torch.isfinite(x).all():
            _checks.fail(name, "contains NaN or Inf")
        x = x.float()
    return x


def _rows(num: int, index: torch.Tensor, device) -> torch.Tensor:
    """``[num]`` bool, True at ``index``."""
    return torch.zeros(num, dtype=torch.bool, device=device).index_fill(0, index, True)


# ---- layouts: which sequences form an example, and what each layout logs ----


class _Pairs:
    """``[chosen_1..chosen_B ; rejected_1..rejected_B]``."""

    def __init__(self, num: int, labels: torch.Tensor, args: dict):
        if num % 2:
            _checks.fail("labels", f"holds {num} sequences; pairs need an even number ([chosen; rejected])")
        self.pairs = num // 2
        pairs = self.pairs
        ref_chosen = _precomputed("ref_chosen_logps", args["ref_chosen_logps"], pairs, labels)
        ref_rejected = _precomputed("ref_rejected_logps", args["ref_rejected_logps"], pairs, labels)
        chosen_h = _precomputed("ref_chosen_entropy", args["ref_chosen_entropy"], pairs, labels)
        rejected_h = _precomputed("ref_rejected_entropy", args["ref_rejected_entropy"], pairs, labels)
        if (ref_chosen is None) != (ref_rejected is None):
            _checks.fail("ref_chosen_logps", "and `ref_rejected_logps` must be given together")
        if (chosen_h is None) != (rejected_h is None):
            _checks.fail("ref_chosen_entropy", "and `ref_rejected_entropy` must be given together")
        if ref_chosen is not None and args["ref_logps"] is not None:
            _checks.fail("ref_logps", "and `ref_chosen_logps`/`ref_rejected_logps` are alternatives; pass one")
        self.ref_logps = None if ref_chosen is None else torch.cat([ref_chosen, ref_rejected])
        self.ref_entropy = None if chosen_h is None else torch.cat([chosen_h, rejected_h])
        arange = torch.arange(num, device=labels.device)
        self.chosen_rows, self.rejected_rows = arange < pairs, arange >= pairs
        self.no_grad_from = None

    def batch(self, seq: SequenceStats, ref: torch.Tensor | None, entropy: torch.Tensor | None, vocab: int
              ) -> PairBatch:
        chosen, rejected = _split(seq, self.pairs)
        n = self.pairs
        return PairBatch(
            chosen=chosen, rejected=rejected,
            ref_chosen_logps=None if ref is None else ref[:n], ref_rejected_logps=None if ref is None else ref[n:],
            ref_chosen_entropy=None if entropy is None else entropy[:n],
            ref_rejected_entropy=None if entropy is None else entropy[n:],
            vocab_size=vocab,
        )

    def wpo(self, seq: SequenceStats) -> torch.Tensor:
        """``w(y_w) w(y_l)`` per pair."""
        w = wpo_weights(seq.mean_logp, seq.mean_log_sum_sq_probs)
        return w[: self.pairs] * w[self.pairs:]

    def metrics(self, result: LossResult, batch: PairBatch) -> dict:
        cr, rr = result.chosen_rewards.float(), result.rejected_rewards.float()
        return {
            "rewards/chosen": cr.mean(),
            "rewards/rejected": rr.mean(),
            "rewards/accuracies": (cr > rr).float().mean(),
            "rewards/margins": (cr - rr).mean(),
            "logps/chosen": batch.chosen.sum_logp.detach().mean(),
            "logps/rejected": batch.rejected.sum_logp.detach().mean(),
        }


class _Groups:
    """K responses per prompt, stored contiguously: ``group_sizes [B]``, best first or ``scores [S]``."""

    def __init__(self, num: int, labels: torch.Tensor, args: dict):
        if args["group_sizes"] is None:
            _checks.fail("group_sizes", "is required by list losses: the number of responses of each prompt")
        self.groups = Groups(args["group_sizes"], num, device=labels.device)
        scores = args["scores"]
        if scores is not None:
            _checks.per_example("scores", scores)
            if scores.shape[0] != num:
                _checks.fail("scores", f"has {scores.shape[0]} entries for {num} sequences (one score per response)")
            _checks.same_device("scores", scores, "labels", labels)
            if not torch.isfinite(scores).all():
                _checks.fail("scores", "contains NaN or Inf")
            scores = self.groups.pad(scores.float())
        self.scores = scores
        best = self.groups.index.gather(1, best_index(self.groups.mask, scores)[:, None])[:, 0]
        self.chosen_rows = _rows(num, best, labels.device)
        self.rejected_rows = ~self.chosen_rows
        self.ref_logps = self.ref_entropy = self.no_grad_from = None

    def batch(self, seq: SequenceStats, ref: torch.Tensor | None, entropy, vocab: int) -> GroupBatch:
        groups = self.groups
        return GroupBatch(
            stats=groups.pad_stats(seq), mask=groups.mask,
            ref_sum_logps=None if ref is None else groups.pad(ref), scores=self.scores,
        )

    def metrics(self, result: ListLossResult, batch: GroupBatch) -> dict:
        return list_metrics(result.rewards, batch.stats.sum_logp, batch.mask, batch.scores)


class _Unpaired:
    """``[examples ; KL rows]``: ``desirable [n]`` labels the examples, ``num_kl_rows`` mismatched rows follow."""

    def __init__(self, num: int, labels: torch.Tensor, args: dict):
        desirable, kl_rows = args["desirable"], args["num_kl_rows"] or 0
        if desirable is None:
            _checks.fail("desirable", "is required by unpaired losses: a bool label per example")
        _checks.tensor("desirable", desirable, ndim=1)
        _checks.same_device("desirable", desirable, "labels", labels)
        if not isinstance(kl_rows, int) or kl_rows < 0:
            _checks.fail("num_kl_rows", f"must be a non-negative int, got {kl_rows!r}")
        self.examples = desirable.shape[0]
        if self.examples == 0:
            _checks.fail("desirable", "is empty: an unpaired loss needs at least one example")
        if self.examples + kl_rows != num:
            _checks.fail("desirable", f"has {self.examples} entries and num_kl_rows={kl_rows}, but labels hold "
                                      f"{num} sequences (examples first, then the KL rows)")
        if desirable.dtype != torch.bool:
            if desirable.dtype.is_floating_point or ((desirable != 0) & (desirable != 1)).any():
                _checks.fail("desirable", f"must be bool or 0/1 integers, got {desirable.dtype}: "
                                          f"{desirable.tolist()[:8]}")
            desirable = desirable.bool()
        self.desirable, self.kl_rows = desirable, kl_rows
        self.num_desirable = int(desirable.sum())
        pad = torch.zeros(kl_rows, dtype=torch.bool, device=labels.device)
        self.chosen_rows = torch.cat([desirable, pad])
        self.rejected_rows = torch.cat([~desirable, pad])
        self.no_grad_from = self.examples if kl_rows else None
        self.ref_logps = self.ref_entropy = None

    def batch(self, seq: SequenceStats, ref: torch.Tensor | None, entropy, vocab: int) -> UnpairedBatch:
        n = self.examples
        examples, kl = _split(seq, n)
        has_kl = self.kl_rows > 0
        return UnpairedBatch(
            stats=examples, desirable=self.desirable, ref_sum_logps=None if ref is None else ref[:n],
            kl_logps=kl.sum_logp.detach() if has_kl else None,
            ref_kl_logps=None if ref is None or not has_kl else ref[n:],
        )

    def metrics(self, result: LossResult, batch: UnpairedBatch) -> dict:
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


_LAYOUTS = {"pairs": _Pairs, "groups": _Groups, "unpaired": _Unpaired}
_LAYOUT_ARGS = {
    "pairs": ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_entropy", "ref_rejected_entropy"),
    "groups": ("group_sizes", "scores"),
    "unpaired": ("desirable", "num_kl_rows"),
}


def _make_layout(spec: LossSpec, num: int, labels: torch.Tensor, args: dict):
    """The layout object of ``spec``; arguments of other layouts are an error, not silently ignored."""
    for layout, names in _LAYOUT_ARGS.items():
        if layout == spec.layout:
            continue
        for name in names:
            if args[name] is not None:
                _checks.fail(name, f"belongs to layout {layout!r}, but loss {spec.name!r} takes {spec.layout!r}")
    return _LAYOUTS[spec.layout](num, labels, args)


def _wpo_option(spec: LossSpec, hparams: dict) -> bool:
    """Pops ``use_weighting`` (WPO); pairwise losses only, and not the batch-sorting AOT losses."""
    if not hparams.pop("use_weighting", False):
        return False
    if spec.layout != "pairs":
        _checks.fail("use_weighting", f"(WPO) weights preference pairs; loss {spec.name!r} takes {spec.layout!r}")
    loss_types = hparams.get("loss_type", ())
    loss_types = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    if {"aot", "aot_unpaired"} & set(loss_types):
        _checks.fail("use_weighting", "cannot weight 'aot'/'aot_unpaired': they sort the batch, misaligning pairs")
    return True


def _level1(hidden, weight, labels, segments: Segments, no_grad_from: int | None, extras: dict, **common) -> TokenStats:
    """Level 1 over all rows; sequences from ``no_grad_from`` on (KTO's KL rows) run without gradient.

    Those rows get ``ignore_index`` in the differentiable call and are the only valid rows of a second,
    ``no_grad`` call: same statistics, no backward GEMMs for rows whose loss gradient is zero.
    """
    if no_grad_from is None:
        return token_stats(hidden, weight, labels, **common, **extras)
    ignore = common["ignore_index"]
    tail = segments.sequence_index(labels.device) >= no_grad_from
    main = token_stats(hidden, weight, labels.masked_fill(tail, ignore), **common, **extras)
    with torch.no_grad():
        side = token_stats(hidden.detach(), weight.detach(), labels.masked_fill(~tail, ignore), **common)
    ref_logp = None if main.ref_logp is None else main.ref_logp + side.ref_logp
    return main._replace(logp=main.logp + side.logp, ref_logp=ref_logp)


def _token_metrics(stats: TokenStats, segments: Segments, num_tokens: torch.Tensor, chosen_rows, rejected_rows) -> dict:
    """TRL's token-level metrics: policy entropy, mean logits of chosen / rejected, chosen top-1 accuracy."""
    tokens = num_tokens.float()

    def token_mean(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return (segments.sum(x.detach().float()) * rows).sum() / (tokens * rows).sum().clamp(min=1)

    return {
        "entropy": token_mean(stats.entropy, chosen_rows | rejected_rows),
        "logits/chosen": token_mean(stats.mean_logits, chosen_rows),
        "logits/rejected": token_mean(stats.mean_logits, rejected_rows),
        "mean_token_accuracy": token_mean(stats.is_top1, chosen_rows),
    }


def preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss: str = "dpo",
    bias: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_chosen_entropy: torch.Tensor | None = None,
    ref_rejected_entropy: torch.Tensor | None = None,
    group_sizes: torch.Tensor | list[int] | None = None,
    scores: torch.Tensor | None = None,
    desirable: torch.Tensor | None = None,
    num_kl_rows: int | None = None,
    logp_weights: torch.Tensor | None = None,
    kl_weights: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    trl_metrics: bool = False,
    logits_budget: int = 0,
    chunk_size: int | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    backend: str | None = None,
    **hparams,
) -> PreferenceOutput:
    r"""Any registered preference loss, fused from the LM head: hidden states in, loss and metrics out.

    How the sequences (rows, or packed sequences) form examples depends on the loss's layout
    (:func:`fastpref.get_loss` ``(name).layout``):

    * ``"pairs"`` (DPO family, SimPO, MallowsPO, TDPO, ...): ``[chosen_1..chosen_B ; rejected_1..rejected_B]``.
    * ``"groups"`` (PRO, MPPO, LiPO, DPO-Plackett-Luce): each prompt's K responses contiguously,
      ``group_sizes [B]`` (K >= 2, may vary); best first, or ``scores [S]`` (higher is better).
    * ``"unpaired"`` (KTO): ``[examples ; KL rows]`` with ``desirable [n]`` and ``num_kl_rows``
      mismatched (prompt, completion) rows for KTO's reference point (run without gradient).

    Only what the loss needs is computed: log-probs always, the reference head only when the loss
    uses it, reference entropies only for MallowsPO, the per-token KL only for TDPO.

    Args:
        hidden: ``[S, T, d]`` (padded) or ``[1, N, d]`` with ``cu_seqlens``/``seq_ids`` (packed),
            aligned with ``labels`` (see :func:`fastpref.shift_labels`).
        weight, bias: the LM head. labels: targets, ``ignore_index`` on prompt and padding.
        loss: registry name (:func:`fastpref.available_losses`).
        ref_logps: precomputed ``[S]`` SUMMED reference log-probs, one per sequence (any layout);
            for pairs, ``ref_chosen_logps`` / ``ref_rejected_logps`` (``[B]`` each) are the same.
            They take precedence over the reference head.
        ref_hidden, ref_weight, ref_bias: a frozen reference head run in the same fused pass
            (``ref_weight`` defaults to ``weight``). Required by TDPO (per-token KL).
        ref_chosen_entropy, ref_rejected_entropy: precomputed ``[B]`` SUMMED reference token
            entropies for MallowsPO's dispersion. Without them MallowsPO uses the reference head, or,
            when there is none, the policy's own entropy without gradient (a stand-in for the
            initial model early in training).
        group_sizes, scores: list layout (see above); ``scores`` per sequence ``[S]``.
        desirable, num_kl_rows: unpaired layout (see above; :mod:`fastpref.losses.unpaired`).
        logp_weights, kl_weights: per-token weights shaped like ``labels`` (may require grad) on the
            log-ratio and KL sums, for losses that accept them (TDPO; TDPO1 + weights = SparsePO).
            Weighted log-ratios need the reference head, not precomputed reference log-probs.
        reduction: ``"mean"`` over examples (pairs / prompts / unpaired examples), ``"sum"`` or ``"none"``.
        trl_metrics: also log ``entropy``, ``logits/chosen``, ``logits/rejected`` and
            ``mean_token_accuracy`` as TRL does (costs a little in the row pass).
        logits_budget, chunk_size, logit_scale, softcap, temperature, backend: see
            :func:`fastpref.token_stats`.
        **hparams: the loss's keyword arguments (``beta``, ``loss_type``, ``alpha``, ...), as in the
            functional loss. ``use_weighting=True`` applies WPO's weights to a pairwise loss.

    Returns:
        :class:`PreferenceOutput` ``(loss, metrics)``; metrics use TRL's names (``rewards/chosen``,
        ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
        ``logps/rejected``, plus loss-specific ones such as ``nll_loss``, ``kl/chosen``, ``kl``,
        ``rank_1_loss``). For lists the best response is "chosen" and the others "rejected".
    """
    spec = get_loss(loss)
    _checks.check_reduction(reduction)
    _checks.tensor("labels", labels, floating=False)
    segments, num_tokens = _layout(labels, cu_seqlens, seq_ids, ignore_index)
    layout = _make_layout(spec, segments.num, labels, dict(
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps, ref_logps=ref_logps,
        ref_chosen_entropy=ref_chosen_entropy, ref_rejected_entropy=ref_rejected_entropy,
        group_sizes=group_sizes, scores=scores, desirable=desirable, num_kl_rows=num_kl_rows,
    ))
    ref_seq = layout.ref_logps
    if ref_seq is None:
        ref_seq = _precomputed("ref_logps", ref_logps, segments.num, labels, what="sequences")
    use_weighting = _wpo_option(spec, hparams)
    if (logp_weights is not None or kl_weights is not None) and not spec.token_weights:
        _checks.fail("logp_weights" if logp_weights is not None else "kl_weights",
                     f"(per-token weights) are not used by loss {spec.name!r}")
    check_token_weights(labels, logp_weights, kl_weights, kl=spec.kl)
    if logp_weights is not None and ref_seq is not None:
        _checks.fail("logp_weights", "weight the reference log-probs per token: use the reference head "
                                     "(`ref_hidden`), not precomputed reference log-probs")

    if spec.reference == "optional":
        hparams.setdefault("reference_free", spec.reference_free_default)
    uses_ref = spec.uses_reference(hparams)
    has_head = ref_hidden is not None
    wants_ref_logps = uses_ref and ref_seq is None
    if wants_ref_logps and not has_head:
        name = "ref_chosen_logps" if spec.layout == "pairs" else "ref_logps"
        _checks.fail(name, f"(or `ref_hidden`) is required: loss {loss!r} uses reference log-probs")
    if spec.kl and not has_head:
        _checks.fail("ref_hidden", f"is required: loss {loss!r} needs the reference distribution (per-token KL)")
    wants_entropy = spec.ref_entropy and layout.ref_entropy is None
    run_head = has_head and (wants_ref_logps or spec.kl or wants_entropy)

    stats = _level1(
        hidden, weight, labels, segments, layout.no_grad_from,
        dict(kl=spec.kl, ref_entropy=wants_entropy and run_head,
             entropy=trl_metrics or (wants_entropy and not run_head), detach_entropy=True,
             log_sum_sq_probs=use_weighting, mean_logits=trl_metrics, is_top1=trl_metrics),
        bias=bias, ignore_index=ignore_index,
        ref_hidden=ref_hidden if run_head else None,
        ref_weight=ref_weight if run_head else None,
        ref_bias=ref_bias if run_head else None,
        logits_budget=logits_budget, chunk_size=chunk_size, logit_scale=logit_scale, softcap=softcap,
        temperature=temperature, backend=backend,
    )
    seq = _reduce(stats, segments, num_tokens, logp_weights, kl_weights)
    if wants_ref_logps:
        ref_seq = seq.ref_sum_logp
    entropy = layout.ref_entropy
    if wants_entropy:
        entropy = (seq.ref_sum_entropy if run_head else seq.sum_entropy).detach()
    vocab = getattr(backend, "vocab_size", None) or weight.shape[0]  # a vocabulary-parallel shard knows the full V
    batch = layout.batch(seq, ref_seq if uses_ref else None, entropy, vocab)
    result = spec.compute(batch, **hparams)
    losses = result.losses * layout.wpo(seq) if use_weighting else result.losses

    metrics = layout.metrics(result, batch)
    metrics.update({k: v.detach() for k, v in result.metrics.items()})
    if trl_metrics:
        metrics.update(_token_metrics(stats, segments, num_tokens, layout.chosen_rows, layout.rejected_rows))
    return PreferenceOutput(_checks.reduce(losses, reduction), metrics)


class PreferenceLoss(torch.nn.Module):
    """Module form of :func:`preference_loss`: ``PreferenceLoss("mallows_dpo", beta=10.0)``.

    ``forward(hidden, weight, labels, **kwargs)`` merges ``kwargs`` over the constructor's keyword
    arguments (per-batch tensors such as ``ref_chosen_logps``, ``group_sizes``, ``scores``,
    ``desirable`` go to ``forward``).

    Example::

        criterion = fastpref.PreferenceLoss("simpo", beta=2.0, gamma_beta_ratio=0.5)
        out = criterion(hidden, model.lm_head.weight, labels)     # rows [chosen; rejected]
        out.loss.backward(); out.metrics["rewards/margins"]

        criterion = fastpref.PreferenceLoss("mppo_pair_mnm")       # 4 scored responses per prompt
        out = criterion(hidden, model.lm_head.weight, labels, group_sizes=[4] * B, scores=scores)
    """

    def __init__(self, loss: str = "dpo", **options):
        super().__init__()
        get_loss(loss)  # fail early on an unknown name
        self.loss = loss
        self.options = options

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **kwargs) -> PreferenceOutput:
        return preference_loss(hidden, weight, labels, loss=self.loss, **{**self.options, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join([repr(self.loss)] + [f"{k}={v!r}" for k, v in self.options.items()])
