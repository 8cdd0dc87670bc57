"""Vocabulary-parallel LM heads: each rank of a process group holds a contiguous shard of ``W``'s rows.

Megatron-style tensor parallelism splits the head ``W [V, d]`` by vocabulary rows; every rank of the
group sees the same tokens (hidden states and labels) and only ``V / world`` logits per token. The
token-statistics op runs unchanged on the local shard: :class:`VocabParallel` describes the sharding
(pass it as ``token_stats(..., vocab_parallel=vp)``, or to :func:`fastpref.preference_loss`), and its
row kernels (:meth:`VocabParallel.kernels`) wrap the real backend's and combine the per-shard
statistics across the group, so every rank ends up with the statistics of the full softmax:

* forward: each shard gives its own ``lse_r`` and shard-local stats; one ``all_gather`` of a few
  ``[C]`` vectors per chunk, then ``lse = logsumexp_r lse_r`` and, with shard weights
  ``w_r = exp(lse_r - lse)``, entropy ``H = sum_r w_r (H_r - log w_r)``,
  ``log sum p^2 = logsumexp_r(2 log w_r + lss_r)``, the target logit from the shard that owns it,
  ``KL(p_ref || p) = sum_r w_ref_r (KL_r + log w_ref_r - log w_r)``, TRL's mean logit and top-1 flag;
* backward: the inner kernel computes ``dL/dz`` on the local columns with the GLOBAL ``lse`` /
  entropy / reference ``lse`` (all that the softmax terms need); targets on another shard are outside
  the local columns, so they add no one-hot term (the backend contract of vocabulary slices);
* ``grad_hidden = dz_local @ W_local`` is a partial sum over shards: :meth:`VocabParallel.hidden`
  (applied by ``token_stats``) wraps ``hidden`` in an identity whose backward all-reduces the gradient
  (Megatron's "copy to tensor-parallel region"). ``grad_W`` / ``grad_bias`` stay local.

Labels are global token ids, validated against the global vocabulary ``vocab_size``. All ranks of the
group must call with the same tokens and the same ``chunk_size`` (the default is computed from the
full vocabulary, so it agrees), since every chunk runs one collective. The collectives need the process
group, which a ``torch.library`` op cannot carry: this path runs through a plain ``autograd.Function``
(a graph break under ``torch.compile``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import _checks
from .backend import RowKernels, Want
from .rows_torch import transform_logits


def shard_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, end)`` rows of rank ``rank`` when ``vocab_size`` rows are split as evenly as possible."""
    per = math.ceil(vocab_size / world_size)
    start = min(rank * per, vocab_size)
    return start, min(start + per, vocab_size)


class _ReduceGradOverVocab(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the vocabulary-parallel group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class VocabParallel:
    """How the head is split over a vocabulary-parallel group (see the module docstring).

    Args:
        vocab_size: the full vocabulary ``V`` (labels are validated against it; MallowsPO's
            ``log V`` uses it too).
        vocab_start: first global row held by this rank.
        local_vocab: number of rows held by this rank (``weight_shard.shape[0]``).
        process_group: the vocabulary-parallel group (default: the world).
        backend: the row kernels run on each shard (a name, or None for the device default); a
            ``backend=`` given to ``token_stats`` takes precedence.

    The constructor runs one ``all_gather`` to learn every rank's shard and checks that the shards
    tile ``[0, V)`` exactly.

    Example (2 ranks, each holding half of the head)::

        start, end = fastpref.ops.vocab_parallel.shard_range(V, rank, world)
        vp = VocabParallel(V, start, end - start)
        stats = fastpref.token_stats(hidden, full_weight[start:end], labels, entropy=True, vocab_parallel=vp)
        out = fastpref.preference_loss(hidden, full_weight[start:end], labels, loss="dpo", vocab_parallel=vp, ...)
    """

    def __init__(self, vocab_size: int, vocab_start: int, local_vocab: int, *, process_group=None,
                 backend: str | None = None):
        if not dist.is_available() or not dist.is_initialized():
            _checks.fail("process_group", "needs an initialised torch.distributed process group")
        self.vocab_size = int(vocab_size)
        self.vocab_start = int(vocab_start)
        self.local_vocab = int(local_vocab)
        self.group = process_group
        self.world = dist.get_world_size(process_group)
        self.backend = backend
        mine = torch.tensor([self.vocab_start, self.local_vocab], dtype=torch.int64)
        everyone = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(everyone, mine, group=process_group)
        self.starts = [int(t[0]) for t in everyone]
        self.sizes = [int(t[1]) for t in everyone]
        covered = sorted(zip(self.starts, self.sizes))
        edge = 0
        for start, size in covered:
            if start != edge or size < 1:
                _checks.fail("vocab_start",
                             f"shards {covered} (start, rows) do not tile [0, {self.vocab_size}) exactly")
            edge = start + size
        if edge != self.vocab_size:
            _checks.fail("vocab_size", f"is {self.vocab_size} but the shards {covered} cover [0, {edge})")
        # order[r] = position of rank r's shard in vocabulary order (for "first maximum wins" across shards)
        self.order = [sorted(self.starts).index(s) for s in self.starts]

    def hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` unchanged, with its gradient summed over the group in backward."""
        return _ReduceGradOverVocab.apply(hidden, self.group)

    def check_shard(self, weight_shard: torch.Tensor) -> None:
        if weight_shard.shape[0] != self.local_vocab:
            _checks.fail("weight", f"has {weight_shard.shape[0]} rows but this rank's shard holds {self.local_vocab}")

    def kernels(self, inner: RowKernels) -> ShardedRows:
        """Row kernels over this rank's shard that combine the statistics across the group."""
        return ShardedRows(self, inner)


class ShardedRows:
    """:class:`fastpref.ops.backend.RowKernels` of one vocabulary shard: ``inner`` on the local columns,
    then one ``all_gather`` of a few ``[C]`` vectors per chunk to combine the shards."""

    def __init__(self, shards: VocabParallel, inner: RowKernels):
        self.shards, self.inner = shards, inner

    def _localise(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local = target - self.shards.vocab_start
        mine = (local >= 0) & (local < self.shards.local_vocab)
        return local.clamp(0, self.shards.local_vocab - 1), mine

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        """``[k, C]`` local rows -> ``[world, k, C]`` (every rank's, in rank order)."""
        rows = rows.contiguous()
        out = [torch.empty_like(rows) for _ in range(self.shards.world)]
        dist.all_gather(out, rows, group=self.shards.group)
        return torch.stack(out)

    def forward_rows(self, logits, target, *, want: Want, ref_logits=None, softcap=0.0, post_scale=1.0):
        local, mine = self._localise(target)
        # The target logit and shard maximum are read from the raw chunk before the inner kernel runs.
        z_t = transform_logits(logits.gather(1, local[:, None]).squeeze(1), softcap, post_scale)[0]
        z_t = torch.where(mine, z_t, torch.zeros_like(z_t))
        z_max = transform_logits(logits.max(dim=1).values, softcap, post_scale)[0] if want.is_top1 else None
        zr_t = None
        if ref_logits is not None:
            zr_t = transform_logits(ref_logits.gather(1, local[:, None]).squeeze(1), softcap, post_scale)[0]
            zr_t = torch.where(mine, zr_t, torch.zeros_like(zr_t))
        part = self.inner.forward_rows(logits, local, want=want, ref_logits=ref_logits, softcap=softcap,
                                  post_scale=post_scale)

        names = ["lse", "z_t", "mine"]
        cols = [part["lse"], z_t, mine.float()]
        for key in ("entropy", "log_sum_sq_probs", "mean_logits"):
            if getattr(want, key):
                names.append(key)
                cols.append(part[key])
        if want.is_top1:
            names += ["max", "is_top1"]
            cols += [z_max, part["is_top1"].float()]
        if ref_logits is not None:
            names += ["ref_lse", "zr_t"]
            cols += [part["ref_lse"], zr_t]
            if want.ref_entropy:
                names.append("ref_entropy")
                cols.append(part["ref_entropy"])
            if want.kl:
                names.append("kl")
                cols.append(part["kl"])
        g = dict(zip(names, self._gather(torch.stack([c.float() for c in cols])).unbind(1)))  # each [world, C]
        return self._combine(g, want, ref_logits is not None)

    def _combine(self, g: dict, want: Want, has_ref: bool) -> dict:
        lse = torch.logsumexp(g["lse"], dim=0)
        log_w = g["lse"] - lse  # log of each shard's share of the probability mass
        out = {"lse": lse, "logp": g["z_t"].sum(0) - lse}
        if want.entropy:
            out["entropy"] = (log_w.exp() * (g["entropy"] - log_w)).sum(0)
        if want.log_sum_sq_probs:
            out["log_sum_sq_probs"] = torch.logsumexp(2 * log_w + g["log_sum_sq_probs"], dim=0)
        if want.mean_logits:
            sizes = torch.tensor(self.shards.sizes, dtype=torch.float32, device=lse.device)[:, None]
            out["mean_logits"] = (g["mean_logits"] * sizes).sum(0) / self.shards.vocab_size
        if want.is_top1:
            out["is_top1"] = self._top1(g)
        if has_ref:
            ref_lse = torch.logsumexp(g["ref_lse"], dim=0)
            log_wr = g["ref_lse"] - ref_lse
            out["ref_lse"] = ref_lse
            out["ref_logp"] = g["zr_t"].sum(0) - ref_lse
            if want.ref_entropy:
                out["ref_entropy"] = (log_wr.exp() * (g["ref_entropy"] - log_wr)).sum(0)
            if want.kl:
                # Shard r's KL of its own (renormalised) softmaxes is kl_r; mixing the shards back with
                # weights w_r, w_ref_r gives KL = sum_r w_ref_r (kl_r + log w_ref_r - log w_r), free of
                # the large-lse cancellation of the direct form.
                out["kl"] = (log_wr.exp() * (g["kl"] + log_wr - log_w)).sum(0)
        return out

    def _top1(self, g: dict) -> torch.Tensor:
        """Global argmax == target, the first maximum (lowest token id) winning, as TRL counts it."""
        mine = g["mine"] > 0.5  # [world, C], exactly one owner per row
        z_t = g["z_t"].sum(0)
        order = torch.tensor(self.shards.order, device=z_t.device)[:, None]  # [world, 1]
        owner_order = (order * mine).sum(0)  # [C]
        before = order < owner_order  # shards with smaller token ids than the owner
        beaten = torch.where(before, g["max"] >= z_t, g["max"] > z_t)
        owner_top1 = (g["is_top1"] * mine).sum(0) > 0.5
        return owner_top1 & ~(beaten & ~mine).any(0)

    def backward_rows_(self, logits, target, lse, *, g_logp=None, g_entropy=None, entropy=None, g_kl=None,
                       ref_logits=None, ref_lse=None, softcap=0.0, post_scale=1.0):
        # With the global lse / entropy / ref_lse, the inner kernel's softmax terms are exact on the local
        # columns; a target on another shard falls outside [0, local width) and adds no one-hot term.
        self.inner.backward_rows_(
            logits, target - self.shards.vocab_start, lse, g_logp=g_logp, g_entropy=g_entropy, entropy=entropy,
            g_kl=g_kl, ref_logits=ref_logits, ref_lse=ref_lse, softcap=softcap, post_scale=post_scale,
        )


__all__ = ["ShardedRows", "VocabParallel", "shard_range"]
