"""A ``dpo_loss``-level override for the legacy ``DPOTrainer`` (TRL 0.9 - 0.28, e.g. LLaMA-Factory's pin).

Those trainers materialise the logits themselves and reduce them to per-sequence log-probs; their
``dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps[, loss_type,
model_output])`` method turns four ``[B]`` tensors into ``(losses, chosen_rewards, rejected_rewards)``.
:class:`FastPrefLegacyDPOMixin` replaces that method with any pairwise fastpref loss, so MallowsPO,
SimPO, DPOP, TODO, ... run in those pipelines unchanged (no memory saving: the logits are TRL's).

What the four tensors do not carry comes from the batch (the mixin keeps it while
``get_batch_loss_metrics`` runs): completion lengths for losses on per-token means (MallowsPO's
default, SimPO, IPO), precomputed reference entropies (``ref_chosen_entropy``/``ref_rejected_entropy``
columns, e.g. from :func:`fastpref.integrations.trl.reference_columns`) for MallowsPO's dispersion,
and any per-pair loss inputs named in ``fastpref_batch_columns``.
"""

from __future__ import annotations

import torch

from .. import _checks
from ..losses.registry import PairBatch
from ..segments import SequenceStats
from ._core import FusedLoss


def completion_lengths(batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(chosen, rejected)`` completion token counts from a legacy batch, or None if it does not say.

    Understands TRL 0.12-0.28 (``chosen_attention_mask`` of the completion ids), TRL <= 0.11
    (``chosen_labels`` with -100 on the prompt) and LLaMA-Factory (``labels`` ``[chosen; rejected]``).
    """
    if "chosen_attention_mask" in batch and "rejected_attention_mask" in batch:
        return batch["chosen_attention_mask"].sum(-1), batch["rejected_attention_mask"].sum(-1)
    if "chosen_labels" in batch and "rejected_labels" in batch:
        return ((batch["chosen_labels"][:, 1:] != -100).sum(-1), (batch["rejected_labels"][:, 1:] != -100).sum(-1))
    if "labels" in batch:
        counts = (batch["labels"][:, 1:] != -100).sum(-1)
        return tuple(counts.chunk(2))
    return None


class FastPrefLegacyDPOMixin:
    """Mix in before a legacy ``DPOTrainer``: ``class Trainer(FastPrefLegacyDPOMixin, DPOTrainer)``.

    Class attributes (or instance attributes set before training):

    * ``fastpref_loss``: a pairwise fastpref loss name (default ``"mallows_dpo"``);
    * ``fastpref_loss_kwargs``: its hyperparameters (``beta`` included);
    * ``fastpref_logps_are_means``: whether the trainer already divided its log-probs by the
      completion length (legacy TRL does for ``loss_type="ipo"``, LLaMA-Factory for ipo/orpo/simpo);
      None (default) = sums;
    * ``fastpref_batch_columns``: batch keys passed to the loss as keyword tensors (``ties``, ...).
    """

    fastpref_loss: str = "mallows_dpo"
    fastpref_loss_kwargs: dict | None = None
    fastpref_logps_are_means: bool | None = None
    fastpref_batch_columns: tuple[str, ...] = ()

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        # The batch is what dpo_loss needs besides its four tensors (lengths, entropies, loss inputs).
        self._fastpref_batch = batch
        try:
            return super().get_batch_loss_metrics(model, batch, train_eval)
        finally:
            self._fastpref_batch = None

    def _fastpref_vocab_size(self) -> int:
        model = getattr(self, "model", None)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and getattr(head, "weight", None) is not None and head.weight.dim() == 2:
            return head.weight.shape[0]
        return int(model.config.vocab_size)

    def dpo_loss(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
                 *args, **kwargs):
        """The legacy signature; extra positional/keyword arguments (``loss_type``, ``model_output``) are ignored."""
        plan = FusedLoss(self.fastpref_loss, dict(self.fastpref_loss_kwargs or {}))
        if plan.layout != "pairs":
            _checks.fail("fastpref_loss", f"must be a pairwise loss for the legacy DPOTrainer, got {plan.loss!r}")
        batch = getattr(self, "_fastpref_batch", None) or {}
        lengths = completion_lengths(batch)
        pc, pr = policy_chosen_logps.float(), policy_rejected_logps.float()
        rc = None if ref_chosen_logps is None else ref_chosen_logps.float()
        rr = None if ref_rejected_logps is None else ref_rejected_logps.float()
        if lengths is None:
            nw = nl = None
        else:
            nw, nl = (n.to(pc.device).clamp(min=1) for n in lengths)
        if self.fastpref_logps_are_means:
            if nw is None:
                _checks.fail("fastpref_logps_are_means", "needs completion lengths in the batch to recover sums")
            pc, pr = pc * nw, pr * nl
            rc, rr = (None, None) if rc is None else (rc * nw, rr * nl)
        if nw is None:
            # Without lengths every sequence counts as one token: means equal sums, exact for sum losses.
            nw = nl = torch.ones_like(pc)

        def stats(total, count):
            return SequenceStats(sum_logp=total, mean_logp=total / count, num_tokens=count)

        entropy = [batch.get("ref_chosen_entropy"), batch.get("ref_rejected_entropy")]
        if plan.wants_ref_entropy and entropy[0] is None:
            _checks.fail("ref_chosen_entropy", f"is required by loss {plan.loss!r} in the legacy trainer: add the "
                                               "columns (fastpref.integrations.trl.reference_columns) or set "
                                               "fastpref_loss_kwargs['neg_log_dispersion']")
        if plan.uses_reference and rc is None:
            _checks.fail("ref_chosen_logps", f"is required by loss {plan.loss!r}")
        pair = PairBatch(
            chosen=stats(pc, nw), rejected=stats(pr, nl),
            ref_chosen_logps=rc if plan.uses_reference else None,
            ref_rejected_logps=rr if plan.uses_reference else None,
            ref_chosen_entropy=None if entropy[0] is None else entropy[0].to(pc.device).float(),
            ref_rejected_entropy=None if entropy[1] is None else entropy[1].to(pc.device).float(),
            vocab_size=self._fastpref_vocab_size(),
        )
        hparams = dict(plan.hparams)
        if plan.spec.reference == "optional":
            hparams.setdefault("reference_free", plan.spec.reference_free_default)
        for key in self.fastpref_batch_columns:
            if key in batch:
                hparams[key] = batch[key]
        result = plan.spec.compute(pair, **hparams)
        self._fastpref_last_metrics = {k: v.detach() for k, v in result.metrics.items()}
        return result.losses, result.chosen_rewards, result.rejected_rewards


__all__ = ["FastPrefLegacyDPOMixin", "completion_lengths"]
