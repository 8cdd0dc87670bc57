"""``FastPrefKTOTrainer``: TRL's ``KTOTrainer`` (>= 0.29) with the loss computed by fastpref's fused op.

Imported through :mod:`fastpref.integrations.trl`, which checks the TRL version first. Datasets
(unpairing, tokenisation, TRL's mismatched KL completions), collation, the sequential sampler, the
optimiser, gradient accumulation, logging and checkpointing are TRL's; the per-step loss is
:func:`fastpref.preference_loss` with ``loss="kto"`` (the ``"unpaired"`` layout) from the policy's
hidden states and head, never its logits.

Per step, as TRL: KTO's reference point ``z`` is the mean over the batch's mismatched (prompt,
completion) rows of ``log pi - log pi_ref`` (summed log-probs, both without gradient, by fastpref's
:func:`fastpref.sequence_logps`), averaged over ranks and clamped at 0; then the policy's forward runs
the fused loss on the examples with ``desirable`` = TRL's ``label`` and ``kl=z``, the reference in the
same fused pass (or TRL's precomputed ``ref_logps``). ``z`` is passed in rather than computed from KL
rows appended to the examples (``num_kl_rows``), which would clamp each rank's own mean: TRL averages
the ranks' means first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl import KTOConfig, KTOTrainer

from .. import _checks
from ._core import FusedLoss, completion_labels, gather_metrics, metric_weights
from ._trl_trainer import FastPrefOptions, FusedTRLMixin, check_reference_settings

# Batch keys of TRL's unpaired collator that are not model inputs.
_NON_MODEL_KEYS = ("completion_mask", "KL_input_ids", "KL_attention_mask", "KL_completion_mask", "label", "ref_logps",
                   "ref_KL_logps")


@dataclass
class FastPrefKTOConfig(FastPrefOptions, KTOConfig):
    """``KTOConfig`` plus fastpref's level-1 options (``fastpref_chunk_size``, ``fastpref_logits_budget``,
    ``fastpref_backend``), checked when the config is built.

    Every KTO field keeps TRL's meaning and is honoured: ``loss_type`` (``"kto"`` or
    ``"apo_zero_unpaired"``), ``beta``, ``desirable_weight``, ``undesirable_weight`` go to fastpref's
    ``"kto"`` loss; ``precompute_ref_log_probs``, ``sync_ref_model``, ``max_length``,
    ``train_sampling_strategy`` work as in TRL. MoE auxiliary losses (``router_aux_loss_coef``) and
    vision datasets are not supported (an error).
    """

    def __post_init__(self):
        super().__post_init__()
        kto_loss_from_config(self)


def kto_loss_from_config(args: KTOConfig) -> FusedLoss:
    """The fastpref ``"kto"`` loss a (FastPref)KTOConfig asks for."""
    hparams = dict(beta=args.beta, loss_type=args.loss_type, desirable_weight=args.desirable_weight,
                   undesirable_weight=args.undesirable_weight)
    options = args.fastpref_options() if isinstance(args, FastPrefOptions) else {}
    check_reference_settings(args, uses_reference=True, loss="kto")
    return FusedLoss("kto", hparams, **options)


class FastPrefKTOTrainer(FusedTRLMixin, KTOTrainer):
    """``KTOTrainer`` whose loss is fastpref's fused KTO (no logits); same arguments, losses and metrics.

    Drop-in::

        from fastpref.integrations.trl import FastPrefKTOConfig as KTOConfig, FastPrefKTOTrainer as KTOTrainer

    The reference is TRL's: ``ref_model``, the policy with its PEFT adapters disabled, or
    ``precompute_ref_log_probs`` (``ref_logps`` / ``ref_KL_logps`` columns, computed by fastpref).
    Metrics: TRL's (``kl``, ``rewards/*``, ``logps/*``, ``logits/*``, ``entropy``, ``num_tokens``), with
    TRL's cross-rank averages (per-example means weighted by each rank's desirable / undesirable
    counts), plus ``mean_token_accuracy`` of the desirable completions.
    """

    _tag_names = ["trl", "kto", "fastpref"]

    def __init__(self, model, ref_model=None, args: KTOConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, **kwargs):
        if args is None:
            args = FastPrefKTOConfig(output_dir="fastpref-kto")
        self.fastpref = kto_loss_from_config(args)
        super().__init__(model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs)
        if self._is_vision_dataset:
            _checks.fail("train_dataset", "is a vision dataset, which FastPrefKTOTrainer does not support")
        if self.aux_loss_enabled:
            _checks.fail("router_aux_loss_coef", "(MoE router auxiliary losses) is not supported; set it to 0")
        self._fastpref_install()

    # ---- reference ----

    def _kl_inputs(self, inputs: dict, model_kwargs: dict) -> tuple[dict, torch.Tensor]:
        """Model inputs and labels of the mismatched KL rows."""
        kwargs = {**model_kwargs, "input_ids": inputs["KL_input_ids"], "attention_mask": inputs["KL_attention_mask"]}
        return kwargs, completion_labels(inputs["KL_input_ids"], inputs["KL_completion_mask"])

    def _reference_sequences(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """TRL's precomputed columns: ``ref_logps`` (and ``ref_KL_logps`` of the KL rows), by fastpref."""
        context = self._reference_context()
        model_kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = completion_labels(batch["input_ids"], batch["completion_mask"])
        out = {"ref_logps": self._sequence_logps(model, model_kwargs, labels, adapter_context=context)["logps"]}
        if self.calculate_KL:
            kl_kwargs, kl_labels = self._kl_inputs(batch, model_kwargs)
            out["ref_KL_logps"] = self._sequence_logps(model, kl_kwargs, kl_labels, adapter_context=context)["logps"]
        return out

    def _reference_point(self, model, inputs: dict, model_kwargs: dict) -> torch.Tensor:
        """KTO's ``z``: the mean of ``log pi - log pi_ref`` over the KL rows, averaged over ranks, clamped at 0."""
        kl_kwargs, kl_labels = self._kl_inputs(inputs, model_kwargs)
        policy = self._sequence_logps(model, kl_kwargs, kl_labels)["logps"]
        if self.precompute_ref_logps:
            ref = inputs["ref_KL_logps"]
        else:
            ref_model, context = self._reference_model()
            ref = self._sequence_logps(ref_model, kl_kwargs, kl_labels, adapter_context=context)["logps"]
        kl = (policy.float() - ref.float()).mean()
        return self.accelerator.gather_for_metrics(kl).mean().clamp(min=0)

    # ---- loss ----

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = completion_labels(inputs["input_ids"], inputs["completion_mask"])
        desirable = inputs["label"].bool()
        loss_inputs = {"desirable": desirable}
        if self.calculate_KL:
            loss_inputs["kl"] = self._reference_point(model, inputs, model_kwargs)
        if self.precompute_ref_logps:
            loss_inputs["ref_logps"] = inputs["ref_logps"]
        else:
            loss_inputs.update(self._reference_head(model_kwargs))
        fn = self.fastpref.closure(labels, self._fastpref_transform, **loss_inputs)
        output = model(**model_kwargs, fastpref_fn=fn)
        metrics = dict(output.metrics)
        metrics.pop("rewards/margins", None)  # TRL takes it from the gathered means
        weights = metric_weights(self.fastpref, labels, loss_inputs, examples=True)
        gathered = gather_metrics(metrics, weights, self.accelerator.gather, empty=None)
        if "rewards/chosen" in gathered and "rewards/rejected" in gathered:
            gathered["rewards/margins"] = gathered["rewards/chosen"] - gathered["rewards/rejected"]
        self._log_fastpref(mode, gathered, inputs)
        if return_outputs:
            return output.loss, self._recomputed_outputs(model, model_kwargs)
        return output.loss


__all__ = ["FastPrefKTOConfig", "FastPrefKTOTrainer", "kto_loss_from_config"]
