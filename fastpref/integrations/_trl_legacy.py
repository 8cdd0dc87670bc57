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
and any per-pair loss inputs named in ``fastpref_batch_columns``. The loss's own metrics
(``neg_log_dispersion``, ``nll_loss``, ...) join TRL's logged metrics.
"""

from __future__ import annotations

import warnings

import torch

from .. import _checks
from ..layouts import PairBatch
from ..needs import resolve_needs, warn_unused
from ..segments import SequenceStats
from ._core import FusedLoss
from .trl import check_trl

# DPOConfig fields that fastpref's "dpo" takes from the trainer when fastpref_loss_kwargs leaves them out
# (the loss_type comes with each dpo_loss call); with any other loss they must keep their defaults.
_TRL_LOSS_FIELDS = {"beta": 0.1, "label_smoothing": 0.0, "f_divergence_type": "reverse_kl",
                    "f_alpha_divergence_coef": 1.0, "discopop_tau": 0.05}


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


def _extends_trl(cls: type) -> bool:
    """Whether a class from the ``trl`` package (its ``DPOTrainer``) is among ``cls``'s bases."""
    return any(base.__module__.split(".")[0] == "trl" for base in cls.__mro__)


def _loss_types(trainer) -> list[str]:
    """The trainer's TRL ``loss_type`` as a list (a string before TRL 0.20)."""
    types = getattr(trainer, "loss_type", None)
    if types is None:
        return []
    return [types] if isinstance(types, str) else list(types)


def _value(x):
    return getattr(x, "value", x)  # TRL's FDivergenceType enum -> its string


class FastPrefLegacyDPOMixin:
    """Mix in before a legacy ``DPOTrainer``: ``class Trainer(FastPrefLegacyDPOMixin, DPOTrainer)``.

    Class attributes (or instance attributes set before training):

    * ``fastpref_loss``: a pairwise fastpref loss name (default ``"mallows_dpo"``). With ``"dpo"`` the
      trainer's own ``loss_type`` (each of a list, weighted by TRL), ``beta``, ``label_smoothing``,
      ``f_divergence_type``, ``f_alpha_divergence_coef``, ``discopop_tau`` and ``reference_free`` apply
      unless ``fastpref_loss_kwargs`` sets them (refused where legacy TRL's convention differs from
      fastpref's: ``loss_type="bco_pair"``, with its running mean, and ``"alpha_divergence"``, whose
      coefficient ``a`` is fastpref's ``1 - a``); any other loss refuses a non-default TRL ``loss_type``,
      ``label_smoothing``, f-divergence or ``reference_free`` (they would be ignored) and warns about an
      unused ``beta``.
    * ``fastpref_loss_kwargs``: its hyperparameters (``beta`` included);
    * ``fastpref_logps_are_means``: whether the trainer already divided its log-probs by the
      completion length (LLaMA-Factory does for ipo/orpo/simpo; legacy TRL for every loss type when its
      ``loss_type`` includes ``"ipo"``, which a named fastpref loss refuses); None (default) = sums.
      TRL's own loss (``"dpo"`` with TRL's ``loss_type``) takes the tensors as TRL made them;
    * ``fastpref_batch_columns``: batch keys passed to the loss as keyword tensors (``ties``, ...).

    Constructed on a TRL ``DPOTrainer``, the installed TRL must be a legacy one (0.9 - 0.28): TRL >= 0.29
    never calls ``dpo_loss`` (use :class:`~fastpref.integrations.trl.FastPrefDPOTrainer` there).
    """

    fastpref_loss: str = "mallows_dpo"
    fastpref_loss_kwargs: dict | None = None
    fastpref_logps_are_means: bool | None = None
    fastpref_batch_columns: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs):
        if _extends_trl(type(self)):
            check_trl("legacy")
        super().__init__(*args, **kwargs)

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        # The batch is what dpo_loss needs besides its four tensors (lengths, entropies, loss inputs).
        self._fastpref_batch = batch
        self._fastpref_metrics = {}
        try:
            loss, metrics = super().get_batch_loss_metrics(model, batch, train_eval)
        finally:
            self._fastpref_batch = None
        return loss, self._with_fastpref_metrics(metrics, train_eval)

    def _with_fastpref_metrics(self, metrics: dict, train_eval: str) -> dict:
        """TRL's metrics plus the loss's own under their names, in TRL's form (floats gathered over
        processes since TRL 0.13, CPU tensors before). TRL's own entries (rewards, log-probs) stay."""
        prefix = "eval_" if train_eval == "eval" else ""
        as_float = any(isinstance(v, float) for v in metrics.values())
        accelerator = getattr(self, "accelerator", None)
        for name, value in self._fastpref_metrics.items():
            key = prefix + name
            if key in metrics:
                continue
            value = value.detach().float().reshape(1)
            if as_float:
                if accelerator is not None:
                    value = accelerator.gather_for_metrics(value)
                metrics[key] = value.mean().item()
            else:
                metrics[key] = value.mean().cpu()
        return metrics

    def _fastpref_vocab_size(self) -> int:
        model = getattr(self, "model", None)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        weight = getattr(head, "weight", None)
        shape = getattr(weight, "ds_shape", None) or getattr(weight, "shape", ())  # ZeRO-3: partitioned
        if len(shape) == 2:
            return int(shape[0])
        return int(model.config.vocab_size)

    def _fastpref_as_trl(self) -> bool:
        """Whether this is TRL's own loss run by fastpref: ``"dpo"`` with the loss_type of each TRL call."""
        return self.fastpref_loss == "dpo" and "loss_type" not in (self.fastpref_loss_kwargs or {})

    def _fastpref_plan(self, loss_type: str | None) -> FusedLoss:
        """The loss of this call, with the trainer's TRL settings applied to ``"dpo"`` or refused for others."""
        hparams = dict(self.fastpref_loss_kwargs or {})
        args = getattr(self, "args", None)
        settings = {} if args is None else {k: _value(getattr(args, k)) for k in _TRL_LOSS_FIELDS if hasattr(args, k)}
        reference_free = bool(getattr(args, "reference_free", False))
        if self._fastpref_as_trl():
            types = [loss_type] if loss_type is not None else _loss_types(self)
            if len(types) == 1:  # TRL < 0.20 calls dpo_loss without it and has one loss type
                hparams["loss_type"] = types[0]
            if "bco_pair" in types:
                _checks.fail("loss_type", "'bco_pair' of legacy TRL subtracts a running mean of the rewards, which "
                                          "fastpref's 'dpo' (TRL >= 0.29's bco_pair) does not: use another loss type")
            if settings.get("f_divergence_type") == "alpha_divergence" and "f_divergence_type" not in hparams:
                coef = settings.get("f_alpha_divergence_coef", _TRL_LOSS_FIELDS["f_alpha_divergence_coef"])
                _checks.fail("f_divergence_type", f"'alpha_divergence' of legacy TRL scores (u_l^-a - u_w^-a) / a, "
                                                  "fastpref's 'dpo' TRL >= 0.29's (u^(a-1) - 1) / (a-1): leave "
                                                  "DPOConfig's at 'reverse_kl' and pass fastpref_loss_kwargs="
                                                  "{'f_divergence_type': 'alpha_divergence', "
                                                  f"'f_alpha_divergence_coef': {1 - coef!r}}} (the same loss)")
            divergence = settings.get("f_divergence_type", "reverse_kl")
            if divergence != "reverse_kl" and "f_divergence_type" not in hparams:
                warnings.warn(f"fastpref: f_divergence_type={divergence!r} is applied; TRL 0.28's own DPO loss ignores "
                              "it (it compares the config's string with an enum), so a plain DPOTrainer there "
                              "trains reverse-KL DPO", UserWarning, stacklevel=4)
            alpha = "f_alpha_divergence_coef"
            if settings.get("f_divergence_type") != "alpha_divergence" and settings.get(alpha) == _TRL_LOSS_FIELDS[alpha]:
                del settings[alpha]  # legacy TRL's default (1.0), unread here; dpo_loss refuses any unread non-default
            for key, value in settings.items():
                hparams.setdefault(key, value)
        else:
            types = _loss_types(self)
            if types not in ([], ["sigmoid"]):
                _checks.fail("loss_type", f"is TRL's ({types}); with fastpref_loss={self.fastpref_loss!r} the loss "
                                          "is fastpref's: leave loss_type at 'sigmoid', or use fastpref_loss='dpo'")
            for key in ("label_smoothing", "f_divergence_type"):  # f_alpha / discopop_tau act only with these
                if key in settings and settings[key] != _TRL_LOSS_FIELDS[key]:
                    _checks.fail(key, f"is a setting of TRL's DPO loss ({settings[key]!r}), not used by fastpref_loss="
                                      f"{self.fastpref_loss!r}: leave it at its default, or use fastpref_loss='dpo'")
            if reference_free:
                hint = ("pass fastpref_loss_kwargs={'reference_free': True}" if "reference_free" in
                        FusedLoss(self.fastpref_loss).spec.hyperparameters else
                        f"loss {self.fastpref_loss!r} has no such setting")
                _checks.fail("reference_free", f"is a setting of TRL's DPO loss, not read by fastpref_loss="
                                               f"{self.fastpref_loss!r}: leave it False; {hint}")
            beta = settings.get("beta", _TRL_LOSS_FIELDS["beta"])
            if beta != _TRL_LOSS_FIELDS["beta"] and "beta" not in hparams:
                warnings.warn(f"fastpref: DPOConfig.beta={beta} is not used by fastpref_loss={self.fastpref_loss!r}; "
                              "pass fastpref_loss_kwargs={'beta': ...} (the loss's own default applies)",
                              UserWarning, stacklevel=4)
        plan = FusedLoss(self.fastpref_loss, hparams)
        if plan.layout != "pairs":
            _checks.fail("fastpref_loss", f"must be a pairwise loss for the legacy DPOTrainer, got {plan.loss!r}")
        return plan

    def _fastpref_legacy_sft(self, beta, policy, ref, args, kwargs):
        """Legacy TRL's loss type 'sft', as TRL computes it: the model output's token-mean NLL of the chosen
        responses for every pair (the log-probs given to ``dpo_loss`` cannot give a token mean), and TRL's
        rewards ``beta * (logp - ref)``, which TRL's loop over loss types weighs like any other type's."""
        output = kwargs.get("model_output", args[0] if args else None)
        if not isinstance(output, dict) or output.get("nll_loss") is None:
            _checks.fail("loss_type", "'sft' of legacy TRL reads the model output's nll_loss, which this TRL does "
                                      "not pass to dpo_loss: use DPOConfig.rpo_alpha (the same NLL, added by TRL)")
        rewards = [beta * (p - (0 if r is None else r)).detach() for p, r in zip(policy, ref)]
        return (output["nll_loss"].expand(policy[0].shape[0]), *rewards)

    def dpo_loss(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
                 loss_type=None, *args, **kwargs):
        """The legacy signature; ``loss_type`` (TRL >= 0.20 passes it) matters for ``fastpref_loss="dpo"``;
        ``model_output`` is read only by loss type 'sft' (TRL's own NLL)."""
        plan = self._fastpref_plan(loss_type)
        if loss_type == "sft" and self._fastpref_as_trl():
            beta = plan.hparams.get("beta", _TRL_LOSS_FIELDS["beta"])
            return self._fastpref_legacy_sft(beta, (policy_chosen_logps, policy_rejected_logps),
                                             (ref_chosen_logps, ref_rejected_logps), args, kwargs)
        batch = getattr(self, "_fastpref_batch", None) or {}
        lengths = completion_lengths(batch)
        pc, pr = policy_chosen_logps.float(), policy_rejected_logps.float()
        rc = None if ref_chosen_logps is None else ref_chosen_logps.float()
        rr = None if ref_rejected_logps is None else ref_rejected_logps.float()
        if lengths is None:
            nw = nl = None
        else:
            nw, nl = (n.to(pc.device).clamp(min=1) for n in lengths)
        rewards_ref = None
        if self._fastpref_as_trl():
            # TRL's own loss types take the four tensors as TRL made them (per-token means for every type
            # of a list that includes "ipo"): one token per sequence keeps them as they are.
            nw = nl = None
            if bool(getattr(getattr(self, "args", None), "reference_free", False)):
                # TRL: the loss's log-ratios are logp - (not reference_free) * ref; its rewards keep the reference
                rewards_ref = (rc, rr)
                rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
        elif self.fastpref_logps_are_means:
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
        needs = resolve_needs(plan.spec, plan.hparams, ref_logps=rc is not None, ref_entropy=entropy[0] is not None,
                              ref_head=False)
        if needs.policy_entropy:
            _checks.fail("ref_chosen_entropy", f"is required by loss {plan.loss!r} in the legacy trainer: add the "
                                               "columns (fastpref.integrations.trl.reference_columns) or set "
                                               "fastpref_loss_kwargs['neg_log_dispersion']")
        warn_unused(plan.spec, needs, {"ref_logps": "the trainer's reference log-probs",
                                       "ref_entropy": "the batch's ref_*_entropy columns"}, stacklevel=3)
        use_entropy = needs.ref_entropy == "precomputed"
        pair = PairBatch(
            chosen=stats(pc, nw), rejected=stats(pr, nl),
            ref_chosen_logps=rc if needs.ref_logps else None,
            ref_rejected_logps=rr if needs.ref_logps else None,
            ref_chosen_entropy=entropy[0].to(pc.device).float() if use_entropy else None,
            ref_rejected_entropy=entropy[1].to(pc.device).float() if use_entropy else None,
            vocab_size=self._fastpref_vocab_size(),
        )
        hparams = dict(plan.hparams)
        if needs.reference_free is not None:
            hparams["reference_free"] = needs.reference_free
        for key in self.fastpref_batch_columns:
            if key not in batch:
                _checks.fail("fastpref_batch_columns", f"names {key!r}, which is not in the batch (keys: "
                                                       f"{sorted(batch)}); keep the column in the dataset and collator")
            hparams[key] = batch[key]
        result = plan.spec.compute(pair, **hparams)
        self._fastpref_metrics = {k: v.detach() for k, v in result.metrics.items()}
        chosen_rewards, rejected_rewards = result.chosen_rewards, result.rejected_rewards
        if rewards_ref is not None:
            beta = hparams.get("beta", _TRL_LOSS_FIELDS["beta"])
            ref = [torch.zeros_like(pc) if r is None else r for r in rewards_ref]
            chosen_rewards, rejected_rewards = (beta * (p - r).detach() for p, r in ((pc, ref[0]), (pr, ref[1])))
        return result.losses, chosen_rewards, rejected_rewards


__all__ = ["FastPrefLegacyDPOMixin", "completion_lengths"]
