"""Level 2: per-token statistics reduced to per-sequence sums and means (cheap, O(N)).

Two layouts give identical numbers:

* padded: ``hidden [R, T, d]``, ``labels [R, T]``, one sequence per row;
* packed (padding-free): ``hidden [1, N, d]`` (or ``[N, d]``), ``labels [1, N]`` (or ``[N]``) with
  ``cu_seqlens [S+1]`` (cumulative sequence lengths, as flash-attention takes them) or ``seq_ids``
  (the sequence index of every position).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _checks
from .ops import TokenStats, token_stats


class SequenceStats(NamedTuple):
    """Per-sequence fp32 statistics over valid (label != ignore_index) tokens; None when not asked.

    ``sum_*`` are sums over the sequence's tokens, ``mean_*`` the same divided by ``num_tokens``.
    Differentiable wherever the underlying token statistic is (see :class:`fastpref.TokenStats`).
    """

    sum_logp: torch.Tensor
    mean_logp: torch.Tensor
    num_tokens: torch.Tensor
    sum_entropy: torch.Tensor | None = None
    mean_entropy: torch.Tensor | None = None
    ref_sum_logp: torch.Tensor | None = None
    ref_mean_logp: torch.Tensor | None = None
    ref_sum_entropy: torch.Tensor | None = None
    ref_mean_entropy: torch.Tensor | None = None
    sum_kl: torch.Tensor | None = None
    tokens: TokenStats | None = None


class Segments:
    """Maps every token position to its sequence and sums per-token tensors per sequence."""

    def __init__(self, labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None, seq_ids: torch.Tensor | None = None):
        if cu_seqlens is not None and seq_ids is not None:
            _checks.fail("cu_seqlens", "and `seq_ids` are alternatives; pass one of them")
        self.shape = labels.shape
        if cu_seqlens is None and seq_ids is None:
            if labels.dim() != 2:
                _checks.fail("labels", f"must be [rows, seq_len] for the padded layout, got shape {tuple(labels.shape)}; "
                                       "pass `cu_seqlens` for packed sequences")
            self.ids = None
            self.num = labels.shape[0]
            return
        if labels.dim() == 2 and labels.shape[0] != 1:
            _checks.fail("labels", f"must be [1, N] or [N] with `cu_seqlens`/`seq_ids`, got shape {tuple(labels.shape)}")
        n = labels.numel()
        if cu_seqlens is not None:
            _checks.tensor("cu_seqlens", cu_seqlens, ndim=1, floating=False)
            _checks.same_device("cu_seqlens", cu_seqlens, "labels", labels)
            if cu_seqlens.numel() < 2:
                _checks.fail("cu_seqlens", "must hold at least [0, N]")
            lengths = cu_seqlens.diff()
            first, last, negative = torch.stack([cu_seqlens[0], cu_seqlens[-1], (lengths < 0).sum()]).tolist()
            if first != 0 or last != n or negative:
                _checks.fail("cu_seqlens", f"must be non-decreasing from 0 to N={n}, got {cu_seqlens.tolist()[:8]}...")
            self.num = cu_seqlens.numel() - 1
            self.ids = torch.repeat_interleave(torch.arange(self.num, device=labels.device), lengths, output_size=n)
        else:
            _checks.tensor("seq_ids", seq_ids, floating=False)
            if seq_ids.numel() != n:
                _checks.fail("seq_ids", f"must have one entry per position ({n}), got shape {tuple(seq_ids.shape)}")
            lo, hi = torch.stack([seq_ids.min(), seq_ids.max()]).tolist()
            if lo < 0:
                _checks.fail("seq_ids", f"must be non-negative, got minimum {lo}")
            self.num = hi + 1
            self.ids = seq_ids.reshape(-1).long()

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sequence sums of a per-token tensor shaped like ``labels``."""
        if self.ids is None:
            return x.sum(dim=-1)
        return x.new_zeros(self.num).index_add(0, self.ids, x.reshape(-1))


def _layout(labels, cu_seqlens, seq_ids, ignore_index) -> tuple[Segments, torch.Tensor]:
    """Validates the layout before any heavy work; returns the segments and valid tokens per sequence."""
    segments = Segments(labels, cu_seqlens, seq_ids)
    num_tokens = segments.sum((labels != ignore_index).to(torch.int64))
    empty = (num_tokens == 0).nonzero().flatten().tolist()
    if empty:
        _checks.fail("labels", f"has sequences with no valid (non-ignore_index) token: indices {empty[:8]}")
    return segments, num_tokens


def _reduce(stats: TokenStats, segments: Segments, num_tokens: torch.Tensor) -> SequenceStats:
    count = num_tokens.float()

    def sum_and_mean(x: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if x is None:
            return None, None
        total = segments.sum(x)
        return total, total / count

    sum_logp, mean_logp = sum_and_mean(stats.logp)
    sum_entropy, mean_entropy = sum_and_mean(stats.entropy)
    ref_sum_logp, ref_mean_logp = sum_and_mean(stats.ref_logp)
    ref_sum_entropy, ref_mean_entropy = sum_and_mean(stats.ref_entropy)
    return SequenceStats(
        sum_logp=sum_logp,
        mean_logp=mean_logp,
        num_tokens=num_tokens,
        sum_entropy=sum_entropy,
        mean_entropy=mean_entropy,
        ref_sum_logp=ref_sum_logp,
        ref_mean_logp=ref_mean_logp,
        ref_sum_entropy=ref_sum_entropy,
        ref_mean_entropy=ref_mean_entropy,
        sum_kl=None if stats.kl is None else segments.sum(stats.kl),
        tokens=stats,
    )


def reduce_tokens(
    stats: TokenStats,
    labels: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> SequenceStats:
    """Reduces :class:`TokenStats` (shaped like ``labels``) to :class:`SequenceStats`.

    Raises ``ValueError`` if a sequence has no valid token (its mean would be 0/0).
    """
    segments, num_tokens = _layout(labels, cu_seqlens, seq_ids, ignore_index)
    return _reduce(stats, segments, num_tokens)


def sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    ignore_index: int = -100,
    **token_stats_kwargs,
) -> SequenceStats:
    """Per-sequence sum/mean log-probs (and entropies, reference stats, KL) straight from the LM head.

    :func:`fastpref.token_stats` followed by :func:`reduce_tokens`; ``token_stats_kwargs`` are passed
    through (``bias``, ``entropy``, ``ref_hidden``, ``kl``, ``logits_budget``, ...).

    Example::

        stats = fastpref.sequence_logps(hidden, model.lm_head.weight, labels)   # hidden [R, T, d]
        stats.sum_logp, stats.mean_logp, stats.num_tokens                        # each [R]
    """
    _checks.tensor("labels", labels, floating=False)
    segments, num_tokens = _layout(labels, cu_seqlens, seq_ids, ignore_index)
    stats = token_stats(hidden, weight, labels, ignore_index=ignore_index, **token_stats_kwargs)
    return _reduce(stats, segments, num_tokens)
