"""Level 2: per-token statistics reduced to per-sequence sums and means (cheap, O(N)).

Two packings of the sequences give identical numbers (:class:`Segments`):

* padded: ``hidden [R, T, d]``, ``labels [R, T]``, one sequence per row;
* packed (padding-free): ``hidden [1, N, d]`` (or ``[N, d]``), ``labels [1, N]`` (or ``[N]``) with
  ``cu_seqlens [S+1]`` (cumulative sequence lengths, as flash-attention takes them) or ``seq_ids``
  (the sequence index of every position).

Per-token weights (``logp_weights``, ``kl_weights``, shaped like ``labels``) turn the sums into
weighted sums ``sum_t w_t x_t`` (SparsePO's masked log-ratio and KL sums); the weights may carry
gradients. :class:`Groups` maps the sequences of list data (K responses per prompt, stored
contiguously) to padded ``[B, K]`` tensors with a mask.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _checks
from .ops import TokenStats, token_stats


class SequenceStats(NamedTuple):
    """Per-sequence fp32 statistics over valid (label != ignore_index) tokens; None when not asked.

    ``sum_*`` are sums over the sequence's tokens, ``mean_*`` the same divided by ``num_tokens``;
    ``weighted_sum_*`` are sums weighted by per-token ``logp_weights`` / ``kl_weights`` (see
    :func:`reduce_tokens`); ``mean_log_sum_sq_probs`` is the mean of ``log sum_v p_t(v)^2`` (WPO).
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
    weighted_sum_logp: torch.Tensor | None = None
    ref_weighted_sum_logp: torch.Tensor | None = None
    weighted_sum_kl: torch.Tensor | None = None
    mean_log_sum_sq_probs: torch.Tensor | None = None


def map_stats(stats: SequenceStats, fn) -> SequenceStats:
    """Applies ``fn`` to every per-sequence tensor of ``stats`` (select, split, pad)."""
    return SequenceStats(*(None if v is None else fn(v) for v in stats))


class Segments:
    """The packing of the sequences: maps every token position to its sequence, sums per sequence.

    Padded (one sequence per row of ``labels [R, T]``) or packed (``labels [1, N]`` / ``[N]`` with
    ``cu_seqlens`` or ``seq_ids``). Validated before any heavy work: ``num`` sequences, each with
    ``num_tokens`` valid (``!= ignore_index``) tokens, at least one (a mean over none is 0/0).
    """

    def __init__(self, labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                 seq_ids: torch.Tensor | None = None, *, ignore_index: int = -100):
        _checks.labels_with(labels, ignore_index)
        self._locate(labels, cu_seqlens, seq_ids)
        self.valid = labels != ignore_index
        self.num_tokens = self.sum(self.valid.to(torch.int64))
        empty = (self.num_tokens == 0).nonzero().flatten().tolist()
        if empty:
            _checks.fail("labels", f"has sequences with no valid (non-ignore_index) token: indices {empty[:8]}")

    def _locate(self, labels, cu_seqlens, seq_ids) -> None:
        if cu_seqlens is not None and seq_ids is not None:
            _checks.fail("cu_seqlens", "and `seq_ids` are alternatives; pass one of them")
        self.shape = labels.shape
        if cu_seqlens is None and seq_ids is None:
            if labels.dim() != 2:
                _checks.fail("labels", f"must be [rows, seq_len] for padded sequences, got shape "
                                       f"{tuple(labels.shape)}; pass `cu_seqlens` for packed sequences")
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
            _checks.same_device("seq_ids", seq_ids, "labels", labels)
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

    def sequence_index(self, device: torch.device) -> torch.Tensor:
        """The sequence index of every position, shaped like ``labels``."""
        if self.ids is None:
            return torch.arange(self.num, device=device)[:, None].expand(self.shape)
        return self.ids.view(self.shape)

    def reduce(self, stats: TokenStats, logp_weights: torch.Tensor | None = None,
               kl_weights: torch.Tensor | None = None) -> SequenceStats:
        """Per-sequence sums and means of ``stats`` (shaped like the labels), and the weighted sums."""
        count = self.num_tokens.float()

        def sum_and_mean(x: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            if x is None:
                return None, None
            total = self.sum(x)
            return total, total / count

        def weighted(w: torch.Tensor | None, x: torch.Tensor | None) -> torch.Tensor | None:
            # the weights are zeroed at ignored positions first: whatever they hold there (NaN too) drops out
            return None if w is None or x is None else self.sum(torch.where(self.valid, w.float(), 0.0) * x)

        sum_logp, mean_logp = sum_and_mean(stats.logp)
        sum_entropy, mean_entropy = sum_and_mean(stats.entropy)
        ref_sum_logp, ref_mean_logp = sum_and_mean(stats.ref_logp)
        ref_sum_entropy, ref_mean_entropy = sum_and_mean(stats.ref_entropy)
        return SequenceStats(
            sum_logp=sum_logp,
            mean_logp=mean_logp,
            num_tokens=self.num_tokens,
            sum_entropy=sum_entropy,
            mean_entropy=mean_entropy,
            ref_sum_logp=ref_sum_logp,
            ref_mean_logp=ref_mean_logp,
            ref_sum_entropy=ref_sum_entropy,
            ref_mean_entropy=ref_mean_entropy,
            sum_kl=None if stats.kl is None else self.sum(stats.kl),
            weighted_sum_logp=weighted(logp_weights, stats.logp),
            ref_weighted_sum_logp=weighted(logp_weights, stats.ref_logp),
            weighted_sum_kl=weighted(kl_weights, stats.kl),
            mean_log_sum_sq_probs=sum_and_mean(stats.log_sum_sq_probs)[1],
        )


class Groups:
    """List data: the sequences ``[0, S)`` hold ``B`` prompts' responses, ``group_sizes[b]`` each, contiguously.

    ``pad(x)`` turns a per-sequence ``[S, ...]`` tensor into ``[B, K, ...]`` (``K = max(group_sizes)``),
    differentiably, with ``fill`` where ``mask`` (``[B, K]`` bool) is False. Every prompt needs at least
    two responses.

    Example::

        stats = fastpref.sequence_logps(hidden, weight, labels)    # 7 rows: 4 + 3 responses
        groups = fastpref.Groups([4, 3], num_sequences=7, device=labels.device)
        logps = groups.pad(stats.mean_logp)                       # [2, 4]; logps[1, 3] is padding
        loss, rewards = fastpref.mppo_pair_mnm_loss(logps, groups.pad(scores), mask=groups.mask)
    """

    def __init__(self, group_sizes, num_sequences: int, device: torch.device | str | None = None):
        if isinstance(group_sizes, torch.Tensor):
            _checks.tensor("group_sizes", group_sizes, ndim=1, floating=False)
            device = group_sizes.device if device is None else device
            sizes = group_sizes.tolist()
        elif isinstance(group_sizes, (list, tuple)) and all(isinstance(k, int) for k in group_sizes):
            sizes = list(group_sizes)
        else:
            _checks.fail("group_sizes", "must be a 1-D integer tensor or a list of ints, "
                                        f"got {type(group_sizes).__name__}")
        if not sizes:
            _checks.fail("group_sizes", "is empty: a list loss needs at least one prompt")
        small = [b for b, k in enumerate(sizes) if k < 2]
        if small:
            _checks.fail("group_sizes", f"must be >= 2 (a list needs two responses); prompts {small[:8]} have "
                                        f"{[sizes[b] for b in small[:8]]}")
        if sum(sizes) != num_sequences:
            _checks.fail("group_sizes", f"sums to {sum(sizes)} but there are {num_sequences} sequences")
        self.sizes = sizes
        self.num_groups, self.max_size = len(sizes), max(sizes)
        sizes_t = torch.tensor(sizes, device=device)
        starts = torch.cumsum(sizes_t, 0) - sizes_t
        col = torch.arange(self.max_size, device=device)
        self.mask = col[None, :] < sizes_t[:, None]
        self.index = torch.where(self.mask, starts[:, None] + col[None, :], 0)

    def pad(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``[S, ...]`` per-sequence values -> ``[B, K, ...]``, ``fill`` at padding."""
        out = x.index_select(0, self.index.reshape(-1)).view(self.num_groups, self.max_size, *x.shape[1:])
        mask = self.mask.view(*self.mask.shape, *([1] * (x.dim() - 1)))
        return torch.where(mask, out, torch.as_tensor(fill, dtype=x.dtype, device=x.device))

    def pad_stats(self, stats: SequenceStats) -> SequenceStats:
        """Every per-sequence field as ``[B, K]`` (``num_tokens`` padded with 1 so means stay finite)."""
        padded = map_stats(stats, self.pad)
        return padded._replace(num_tokens=self.pad(stats.num_tokens, fill=1))


def check_token_weights(
    labels: torch.Tensor, logp_weights: torch.Tensor | None, kl_weights: torch.Tensor | None, *, kl: bool,
    ignore_index: int = -100,
) -> None:
    """Per-token weights are floating tensors shaped like ``labels``, finite where the label is not
    ``ignore_index`` (anything at ignored positions is dropped); ``kl_weights`` needs the KL."""
    for name, w in (("logp_weights", logp_weights), ("kl_weights", kl_weights)):
        if w is None:
            continue
        _checks.tensor(name, w)
        if not w.dtype.is_floating_point:
            _checks.fail(name, f"must be floating point, got {w.dtype}")
        if w.shape != labels.shape:
            _checks.fail(name, f"has shape {tuple(w.shape)}; expected the shape of labels {tuple(labels.shape)}")
        _checks.same_device(name, w, "labels", labels)
        bad = ~torch.isfinite(w.detach()) & (labels != ignore_index)
        if bad.any():
            _checks.fail(name, f"has non-finite values at {int(bad.sum())} scored (non-ignore_index) positions")
    if kl_weights is not None and not kl:
        _checks.fail("kl_weights", "weights the per-token KL, which needs kl=True (and a reference head)")


def reduce_tokens(
    stats: TokenStats,
    labels: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    ignore_index: int = -100,
    logp_weights: torch.Tensor | None = None,
    kl_weights: torch.Tensor | None = None,
) -> SequenceStats:
    r"""Reduces :class:`TokenStats` (shaped like ``labels``) to :class:`SequenceStats`.

    ``logp_weights`` / ``kl_weights`` (shaped like ``labels``, may require grad) add the weighted sums
    ``weighted_sum_logp = sum_t w_t logp_t``, ``ref_weighted_sum_logp = sum_t w_t ref_logp_t`` and
    ``weighted_sum_kl = sum_t w_t kl_t`` (SparsePO's masked sums: with TDPO1 they give its objective).
    Raises ``ValueError`` if a sequence has no valid token (its mean would be 0/0).
    """
    _checks.tensor("labels", labels, floating=False)
    if not isinstance(stats, TokenStats) or stats.logp.shape != labels.shape:
        got = f"logp of shape {tuple(stats.logp.shape)}" if isinstance(stats, TokenStats) else type(stats).__name__
        _checks.fail("stats", f"must be the TokenStats of these labels (shape {tuple(labels.shape)}), got {got}")
    check_token_weights(labels, logp_weights, kl_weights, kl=stats.kl is not None, ignore_index=ignore_index)
    negative = (labels < 0) & (labels != ignore_index)
    if negative.any():  # token_stats refuses them too: these labels were scored with another ignore_index
        _checks.fail("labels", f"hold negative values other than ignore_index={ignore_index} "
                               f"({sorted(set(labels[negative].tolist()))[:4]}); pass the ignore_index given to "
                               "token_stats")
    return Segments(labels, cu_seqlens, seq_ids, ignore_index=ignore_index).reduce(stats, logp_weights, kl_weights)


def sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    ignore_index: int = -100,
    logp_weights: torch.Tensor | None = None,
    kl_weights: torch.Tensor | None = None,
    **token_stats_kwargs,
) -> SequenceStats:
    """Per-sequence sum/mean log-probs (and entropies, reference stats, KL) straight from the LM head.

    :func:`fastpref.token_stats` followed by :func:`reduce_tokens`; ``token_stats_kwargs`` are passed
    through (``bias``, ``entropy``, ``ref_hidden``, ``kl``, ``logits_budget``, ...);
    ``logp_weights`` / ``kl_weights`` give per-token weighted sums (see :func:`reduce_tokens`).

    Example::

        stats = fastpref.sequence_logps(hidden, model.lm_head.weight, labels)   # hidden [R, T, d]
        stats.sum_logp, stats.mean_logp, stats.num_tokens                        # each [R]
    """
    _checks.tensor("labels", labels, floating=False)
    for extra in ("mean_logits", "is_top1"):  # token-level metrics: SequenceStats has no field for them
        if token_stats_kwargs.get(extra):
            _checks.fail(extra, "is a per-token statistic that sequence_logps does not reduce; call "
                                "fastpref.token_stats for it")
    check_token_weights(labels, logp_weights, kl_weights, kl=bool(token_stats_kwargs.get("kl")),
                        ignore_index=ignore_index)
    segments = Segments(labels, cu_seqlens, seq_ids, ignore_index=ignore_index)
    stats = token_stats(hidden, weight, labels, ignore_index=ignore_index, **token_stats_kwargs)
    return segments.reduce(stats, logp_weights, kl_weights)
