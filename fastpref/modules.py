"""The fused front door: hidden states + LM head -> any registered preference loss, and its nn.Module."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _checks
from .losses.registry import LossResult, PairBatch, get_loss
from .ops import token_stats
from .segments import Segments, SequenceStats, _layout, _reduce


class PreferenceOutput(NamedTuple):
    """``loss`` (reduced as asked) and detached scalar ``metrics`` under TRL's names."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def _split(stats: SequenceStats, n: int) -> tuple[SequenceStats, SequenceStats]:
    """Per-sequence stats of ``[first n; rest]`` (pairs: chosen, rejected)."""

    def part(sl):
        return SequenceStats(*(x[sl] if isinstance(x, torch.Tensor) else None for x in stats[:-1]), tokens=None)

    return part(slice(0, n)), part(slice(n, None))


def _precomputed(name: str, x: torch.Tensor | None, pairs: int, labels: torch.Tensor) -> torch.Tensor | None:
    if x is not None:
        _checks.per_example(name, x)
        if x.shape[0] != pairs:
            _checks.fail(name, f"has {x.shape[0]} entries for {pairs} pairs")
        _checks.same_device(name, x, "labels", labels)
        x = x.float()
    return x


def _metrics(result: LossResult, chosen: SequenceStats, rejected: SequenceStats, token_sums: dict) -> dict:
    cr, rr = result.chosen_rewards.float(), result.rejected_rewards.float()
    metrics = {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/accuracies": (cr > rr).float().mean(),
        "rewards/margins": (cr - rr).mean(),
        "logps/chosen": chosen.sum_logp.detach().mean(),
        "logps/rejected": rejected.sum_logp.detach().mean(),
    }
    metrics.update({k: v.detach() for k, v in result.metrics.items()})
    metrics.update(token_sums)
    return metrics


def preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss: str = "dpo",
    bias: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_chosen_entropy: torch.Tensor | None = None,
    ref_rejected_entropy: torch.Tensor | None = None,
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

    Rows (or packed sequences) are ``[chosen_1..chosen_B ; rejected_1..rejected_B]``. Only what the
    loss needs is computed (see :func:`fastpref.available_losses`): log-probs always, the reference
    head only when the loss uses it, reference entropies only for MallowsPO.

    Args:
        hidden: ``[2B, T, d]`` (padded) or ``[1, N, d]`` with ``cu_seqlens``/``seq_ids`` (packed),
            aligned with ``labels`` (see :func:`fastpref.shift_labels`).
        weight, bias: the LM head. labels: targets, ``ignore_index`` on prompt and padding.
        loss: registry name ("dpo", "simpo", "mallows_dpo", ...).
        ref_chosen_logps, ref_rejected_logps: precomputed ``[B]`` SUMMED reference log-probs
            (TRL's ``precompute_ref_log_probs``); take precedence over the reference head.
        ref_hidden, ref_weight, ref_bias: a frozen reference head run in the same fused pass
            (``ref_weight`` defaults to ``weight``).
        ref_chosen_entropy, ref_rejected_entropy: precomputed ``[B]`` SUMMED reference token
            entropies for MallowsPO's dispersion. Without them MallowsPO uses the reference head, or,
            when there is none, the policy's own entropy without gradient (a stand-in for the
            initial model early in training).
        reduction: ``"mean"`` over pairs (default), ``"sum"`` or ``"none"``.
        trl_metrics: also log ``entropy``, ``logits/chosen``, ``logits/rejected`` and
            ``mean_token_accuracy`` as TRL does (costs a little in the row pass).
        logits_budget, chunk_size, logit_scale, softcap, temperature, backend: see
            :func:`fastpref.token_stats`.
        **hparams: the loss's keyword arguments (``beta``, ``loss_type``, ``gamma_beta_ratio``,
            ``neg_log_dispersion``, ...), as in the functional loss.

    Returns:
        :class:`PreferenceOutput` ``(loss, metrics)``; metrics use TRL's names (``rewards/chosen``,
        ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
        ``logps/rejected``, plus loss-specific ones such as ``nll_loss``).
    """
    spec = get_loss(loss)
    _checks.check_reduction(reduction)
    _checks.tensor("labels", labels, floating=False)
    segments, num_tokens = _layout(labels, cu_seqlens, seq_ids, ignore_index)
    if segments.num % 2:
        _checks.fail("labels", f"holds {segments.num} sequences; pairs need an even number ([chosen; rejected])")
    pairs = segments.num // 2
    ref_chosen_logps = _precomputed("ref_chosen_logps", ref_chosen_logps, pairs, labels)
    ref_rejected_logps = _precomputed("ref_rejected_logps", ref_rejected_logps, pairs, labels)
    ref_chosen_entropy = _precomputed("ref_chosen_entropy", ref_chosen_entropy, pairs, labels)
    ref_rejected_entropy = _precomputed("ref_rejected_entropy", ref_rejected_entropy, pairs, labels)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        _checks.fail("ref_chosen_logps", "and `ref_rejected_logps` must be given together")
    if (ref_chosen_entropy is None) != (ref_rejected_entropy is None):
        _checks.fail("ref_chosen_entropy", "and `ref_rejected_entropy` must be given together")

    if spec.reference == "optional":
        hparams.setdefault("reference_free", spec.reference_free_default)
    has_head = ref_hidden is not None
    wants_ref_logps = spec.uses_reference(hparams) and ref_chosen_logps is None
    if wants_ref_logps and not has_head:
        _checks.fail("ref_chosen_logps", f"(or `ref_hidden`) is required: loss {loss!r} uses reference log-probs")
    if spec.kl and not has_head:
        _checks.fail("ref_hidden", f"is required: loss {loss!r} needs the reference distribution (per-token KL)")
    wants_entropy = spec.ref_entropy and ref_chosen_entropy is None
    run_head = has_head and (wants_ref_logps or spec.kl or wants_entropy)

    stats = token_stats(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index,
        ref_hidden=ref_hidden if run_head else None,
        ref_weight=ref_weight if run_head else None,
        ref_bias=ref_bias if run_head else None,
        kl=spec.kl, ref_entropy=wants_entropy and run_head,
        entropy=trl_metrics or (wants_entropy and not run_head), detach_entropy=True,
        mean_logits=trl_metrics, is_top1=trl_metrics,
        logits_budget=logits_budget, chunk_size=chunk_size, logit_scale=logit_scale, softcap=softcap,
        temperature=temperature, backend=backend,
    )
    seq = _reduce(stats, segments, num_tokens)
    chosen, rejected = _split(seq, pairs)
    if wants_ref_logps:
        ref_chosen_logps, ref_rejected_logps = chosen.ref_sum_logp, rejected.ref_sum_logp
    if wants_entropy:
        source = (chosen.ref_sum_entropy, rejected.ref_sum_entropy) if run_head else (chosen.sum_entropy, rejected.sum_entropy)
        ref_chosen_entropy, ref_rejected_entropy = (x.detach() for x in source)
    batch = PairBatch(
        chosen=chosen, rejected=rejected,
        ref_chosen_logps=ref_chosen_logps if spec.uses_reference(hparams) else None,
        ref_rejected_logps=ref_rejected_logps if spec.uses_reference(hparams) else None,
        ref_chosen_entropy=ref_chosen_entropy, ref_rejected_entropy=ref_rejected_entropy,
        vocab_size=weight.shape[0],
    )
    result = spec.compute(batch, **hparams)
    token_sums = _token_metrics(stats, segments, num_tokens, pairs) if trl_metrics else {}
    return PreferenceOutput(_checks.reduce(result.losses, reduction), _metrics(result, chosen, rejected, token_sums))


def _token_metrics(stats, segments: Segments, num_tokens: torch.Tensor, pairs: int) -> dict:
    """TRL's token-level metrics: policy entropy, mean logits per half, chosen top-1 accuracy."""
    chosen_tokens = num_tokens[:pairs].sum()
    rejected_tokens = num_tokens[pairs:].sum()
    mean_logits = segments.sum(stats.mean_logits)
    return {
        "entropy": stats.entropy.detach().sum() / num_tokens.sum(),
        "logits/chosen": mean_logits[:pairs].sum() / chosen_tokens,
        "logits/rejected": mean_logits[pairs:].sum() / rejected_tokens,
        "mean_token_accuracy": segments.sum(stats.is_top1.float())[:pairs].sum() / chosen_tokens,
    }


class PreferenceLoss(torch.nn.Module):
    """Module form of :func:`preference_loss`: ``PreferenceLoss("mallows_dpo", beta=10.0)``.

    ``forward(hidden, weight, labels, **kwargs)`` merges ``kwargs`` over the constructor's keyword
    arguments (per-batch tensors such as ``ref_chosen_logps`` go to ``forward``).

    Example::

        criterion = fastpref.PreferenceLoss("simpo", beta=2.0, gamma_beta_ratio=0.5)
        out = criterion(hidden, model.lm_head.weight, labels)     # rows [chosen; rejected]
        out.loss.backward(); out.metrics["rewards/margins"]
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
