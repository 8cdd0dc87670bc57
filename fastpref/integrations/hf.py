"""Hugging Face ``Trainer`` without TRL: a ``compute_loss`` helper and a mixin for your own preference collator.

Batches hold ``input_ids`` / ``attention_mask`` rows in the layout of the loss (pairs:
``[chosen_1..chosen_B ; rejected_1..rejected_B]``; lists: each prompt's responses in consecutive rows
with ``group_sizes``), which tokens are scored as HF-style ``labels`` (``-100`` on prompt and padding,
not shifted) or a ``completion_mask`` (1 on completion tokens), and any per-batch loss inputs by
their :func:`fastpref.preference_loss` names (``ref_chosen_logps``, ``ref_rejected_logps``,
``ref_chosen_entropy``, ``scores``, ``group_sizes``, ...). Every other key goes to the model.

Example::

    class PrefTrainer(FastPrefTrainerMixin, transformers.Trainer):
        pass

    trainer = PrefTrainer(model=model, args=TrainingArguments(..., remove_unused_columns=False),
                          train_dataset=ds, data_collator=my_pair_collator,
                          fastpref_loss="mallows_dpo", fastpref_loss_kwargs={"beta": 10.0}, ref_model=ref)
    trainer.train()      # logs loss, rewards/*, logps/*, entropy, ... like TRL

Gradient accumulation: the loss of a micro-batch is its mean over examples and the ``Trainer`` divides
it by the accumulation steps (TRL's convention), whatever ``num_items_in_batch`` says.
"""

from __future__ import annotations

import functools
import inspect
import typing
import warnings
from collections import defaultdict

import torch

from .. import _checks
from . import _head
from ._core import (
    OPTIONS,
    FusedLoss,
    PreferenceOutput,
    completion_labels,
    gather_metrics,
    metric_weights,
    reference_head,
    split_batch,
)


def _peft_reference(model):
    """Adapter-disabled context of a PEFT policy, or None."""
    unwrapped = getattr(model, "module", model)
    if hasattr(unwrapped, "disable_adapter") and hasattr(unwrapped, "peft_config"):
        return unwrapped.disable_adapter()
    return None


def _model_input_names(model) -> frozenset[str] | None:
    """The keyword arguments the model's forward reads (None when it takes unannotated ``**kwargs``)."""
    unwrapped = getattr(model, "module", model)
    unwrapped = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    return _forward_input_names(type(unwrapped))


@functools.lru_cache(maxsize=None)
def _forward_input_names(model_class) -> frozenset[str] | None:
    forward = model_class.forward
    names = set()
    for name, parameter in inspect.signature(forward).parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            try:  # transformers annotates them: **kwargs: Unpack[TransformersKwargs] (a TypedDict)
                hint = typing.get_type_hints(forward, include_extras=True).get(name)
            except Exception:  # noqa: BLE001 - unresolvable annotations: cannot tell
                return None
            typed = (typing.get_args(hint) or (None,))[0]
            if not hasattr(typed, "__optional_keys__"):
                return None
            names |= set(typed.__optional_keys__) | set(typed.__required_keys__)
        elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
            names.add(name)
    return frozenset(names)


def fastpref_compute_loss(model, inputs: dict, loss: FusedLoss | str = "dpo", *, ref_model=None,
                          copy_ref_head: bool = False, **hparams) -> PreferenceOutput:
    """The fused preference loss of one batch through ``model``'s own forward (see the module docstring).

    Args:
        model: the policy (plain, DDP/FSDP/DeepSpeed-wrapped or PEFT); patched on first use.
        inputs: the collated batch. Keys the loss takes (its per-batch inputs, and hyperparameters
            such as MMPO's ``soft_labels``) go to the loss; a key that neither the loss nor the
            model's forward reads is an error (it would be silently dropped).
        loss: a :class:`FusedLoss`, or a loss name with ``**hparams``
            (``chunk_size``, ``logits_budget`` and ``backend`` among them go to level 1), checked
            against the loss.
        ref_model: frozen reference model, run in the same fused pass when the loss needs it and the
            batch has no precomputed reference columns. Without it a PEFT policy's disabled adapters
            are the reference; MallowsPO without any reference uses the policy's entropy (no grad).
        copy_ref_head: copy the reference head out of its forward (set it for FSDP/ZeRO-3 references).

    Returns:
        :class:`fastpref.PreferenceOutput` ``(loss, metrics)``.
    """
    if isinstance(loss, FusedLoss):
        if hparams:
            _checks.fail(next(iter(hparams)), "cannot be given with a FusedLoss `loss`: set it in the FusedLoss")
        plan = loss
    else:
        options = {k: hparams.pop(k) for k in OPTIONS if k in hparams}
        plan = FusedLoss(loss, hparams, **options)
    _head.install(getattr(model, "module", model))
    model_kwargs, loss_inputs = split_batch(inputs, plan)
    accepted = _model_input_names(model)
    if accepted is not None:
        unknown = sorted(set(model_kwargs) - accepted)
        if unknown:
            _checks.fail("inputs", f"has keys {unknown} that neither loss {plan.loss!r} nor the model's forward "
                                   "reads; remove them or fix their names")
    labels = completion_labels(inputs["input_ids"], inputs.get("completion_mask"), inputs.get("labels"))
    ref = {}
    if plan.needs(loss_inputs).run_ref_head:
        peft = _peft_reference(model) if ref_model is None else None
        if ref_model is not None:
            _head.install(getattr(ref_model, "module", ref_model))
            _head.check_reference(getattr(model, "module", model), getattr(ref_model, "module", ref_model))
            hidden, weight, bias = reference_head(ref_model, model_kwargs, copy=copy_ref_head)
            ref = {"ref_hidden": hidden, "ref_weight": weight, "ref_bias": bias}
        elif peft is not None:
            hidden, _, _ = reference_head(model, model_kwargs, adapter_context=peft)
            ref = {"ref_hidden": hidden}
        else:
            try:  # without any reference: fine only for what the policy can stand in for (MallowsPO's entropy)
                plan.needs(loss_inputs, ref_head=False)
            except ValueError as err:
                raise ValueError(f"{err}: pass ref_model, precomputed reference columns, or a PEFT policy") from err
    transform = _head.logit_transform(getattr(model, "module", model))
    fn = plan.closure(labels, transform, **ref, **loss_inputs)
    return model(**model_kwargs, fastpref_fn=fn)


class FastPrefTrainerMixin:
    """Mix into ``transformers.Trainer`` (first in the bases): the loss is a fastpref loss by name.

    Extra constructor keywords: ``fastpref_loss`` (default ``"dpo"``), ``fastpref_loss_kwargs``,
    ``ref_model`` (frozen, put in eval mode and prepared for evaluation by the accelerator),
    ``fastpref_options`` (``chunk_size``, ``logits_budget``, ``backend``), all checked when the trainer
    is built. The Trainer's own loss settings, ``compute_loss_func`` and ``label_smoothing_factor``,
    are refused: the preference loss replaces that loss. Metrics are averaged over
    the logging interval under TRL's names (``eval_*`` during evaluation, where the fused loss runs on
    every batch). ``compute_loss(..., return_outputs=True)`` recomputes the logits with an extra
    forward, as TRL's trainers do.
    """

    # transformers >= 5.19: the Trainer divides the micro-batch loss by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, fastpref_loss: str = "dpo", fastpref_loss_kwargs: dict | None = None, ref_model=None,
                 fastpref_options: dict | None = None, **kwargs):
        options = dict(fastpref_options or {})
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            _checks.fail("fastpref_options", f"has unknown keys {unknown}; accepted: {list(OPTIONS)}")
        self.fastpref = FusedLoss(fastpref_loss, dict(fastpref_loss_kwargs or {}), **options)
        super().__init__(*args, **kwargs)
        if getattr(self, "compute_loss_func", None) is not None:
            _checks.fail("compute_loss_func", "would never be called: the loss is fastpref_loss="
                                              f"{self.fastpref.loss!r}; leave it None")
        if self.args.label_smoothing_factor:
            _checks.fail("label_smoothing_factor", f"is {self.args.label_smoothing_factor}, but it smooths the "
                                                   "Trainer's token cross-entropy, which the preference loss replaces; "
                                                   "set it to 0 (a loss's own label_smoothing goes in "
                                                   "fastpref_loss_kwargs)")
        # Older transformers read only these: no loss kwargs -> divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        # Patch before accelerate wraps the forwards (autocast, fp32 outputs), so the wrappers enclose the
        # fused path too.
        _head.install(self.model)
        self.ref_model = None
        if ref_model is not None:
            ref_model.requires_grad_(False).eval()  # frozen, no dropout: the Trainer trains (and .train()s) the policy
            _head.install(ref_model)
            _head.check_reference(self.model, ref_model)
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self._fastpref_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        copy = bool(getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False))
        out = fastpref_compute_loss(model, inputs, self.fastpref, ref_model=self.ref_model, copy_ref_head=copy)
        mode = "train" if model.training else "eval"
        labels = completion_labels(inputs["input_ids"], inputs.get("completion_mask"), inputs.get("labels"))
        _, loss_inputs = split_batch(inputs, self.fastpref)
        weights = metric_weights(self.fastpref, labels, loss_inputs, examples=self.fastpref.layout == "unpaired")
        for key, value in gather_metrics(out.metrics, weights, self.accelerator.gather).items():
            self._fastpref_metrics[mode][key].append(value)
        if not return_outputs:
            return out.loss
        warnings.warn("`return_outputs=True` recomputes the logits with an extra forward pass (the fused loss never "
                      "builds them)", FutureWarning, stacklevel=2)
        model_kwargs, _ = split_batch(inputs, self.fastpref)
        with torch.no_grad():
            return out.loss, model(**model_kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The fused loss on every evaluation batch (the ``Trainer``'s would skip it without a ``labels`` key)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            if prediction_loss_only:
                return self.compute_loss(model, inputs).detach(), None, None
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        return loss.detach(), outputs.logits, inputs["input_ids"]

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # as TRL's trainers: the mode is the model's (what compute_loss stored under), whatever the key prefix
        mode = "train" if self.model.training else "eval"
        stored = self._fastpref_metrics[mode]
        prefix = "eval_" if mode == "eval" else ""
        logs.update({f"{prefix}{k}": sum(v) / len(v) for k, v in stored.items() if v})
        stored.clear()
        super().log(logs, *args, **kwargs)


__all__ = ["FastPrefTrainerMixin", "FusedLoss", "fastpref_compute_loss"]
