"""``FastPrefDPOTrainer``: TRL's ``DPOTrainer`` (>= 0.29) with the loss computed by fastpref's fused op.

Imported through :mod:`fastpref.integrations.trl`, which checks the TRL version first. Only the loss
changes: datasets, tokenisation, collation, the optimiser, gradient accumulation (TRL returns the
micro-batch mean over pairs and the HF ``Trainer`` divides by the accumulation steps; this trainer
returns the same quantity), logging and checkpointing are TRL's.

Per step: the reference backbone runs without gradient when the loss needs it (its hidden states and
head feed the same fused pass as the policy: no reference logits either), then the policy's forward
runs its backbone and :func:`fastpref.preference_loss` on the hidden states and the (gathered) head.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import is_peft_model, tqdm
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing, prepare_deepspeed
from trl.trainer.utils import use_adapter

from . import _head
from ._core import (
    FusedLoss,
    completion_labels,
    gather_metrics,
    reference_head,
    sequence_reference_stats,
    split_batch,
    token_counts,
)
from .collators import ListwiseCollator, WithColumns, prepare_listwise_dataset

_TRL_DEFAULT_BETA = 0.1
# TRL applies label_smoothing to these loss types only (>= 0.29); fastpref's "dpo" would also smooth "sigmoid".
_SMOOTHED = {"exo_pair", "robust", "aot", "aot_unpaired"}


@dataclass
class FastPrefDPOConfig(DPOConfig):
    """``DPOConfig`` plus the fastpref fields (every TRL field keeps its meaning).

    Args:
        fastpref_loss: a fastpref loss name (:func:`fastpref.available_losses`). None (default) runs
            TRL's own loss settings (``loss_type``, ``loss_weights``, ``beta``, ``f_divergence_type``,
            ``label_smoothing``, ``use_weighting``) through fastpref's ``"dpo"``: the same numbers as
            ``DPOTrainer``. Pairwise losses use TRL's preference datasets; list losses
            (``layout="groups"``: PRO, MPPO, LiPO, ...) take ``prompt`` + ``completions`` (+ ``scores``).
        fastpref_loss_kwargs: the loss's hyperparameters. For a named loss, ``beta`` comes from here
            (or the loss's own default, e.g. MallowsPO's 10), NOT from ``DPOConfig.beta``.
        fastpref_batch_columns: dataset columns handed to the loss per batch as tensors, e.g.
            ``["ties"]`` for TODO or ``["soft_labels"]`` for MMPO.
        fastpref_chunk_size, fastpref_logits_budget, fastpref_backend: level-1 options
            (:func:`fastpref.token_stats`).
    """

    fastpref_loss: str | None = field(default=None, metadata={"help": "fastpref loss name; None = TRL's loss_type."})
    fastpref_loss_kwargs: dict[str, Any] | None = field(default=None, metadata={"help": "Loss hyperparameters."})
    fastpref_batch_columns: list[str] | None = field(default=None, metadata={"help": "Per-batch loss inputs."})
    fastpref_chunk_size: int | None = field(default=None, metadata={"help": "Rows per fused chunk."})
    fastpref_logits_budget: int = field(default=0, metadata={"help": "Bytes of chunk logits kept for backward."})
    fastpref_backend: str | None = field(default=None, metadata={"help": "Row-kernel backend: torch/triton/cpp."})


def loss_from_config(args: DPOConfig) -> FusedLoss:
    """The :class:`FusedLoss` a (FastPref)DPOConfig asks for; TRL settings fastpref cannot honour raise."""
    name = getattr(args, "fastpref_loss", None)
    kwargs = dict(getattr(args, "fastpref_loss_kwargs", None) or {})
    if args.ld_alpha is not None:
        raise NotImplementedError("fastpref: `ld_alpha` (LD-DPO) is not supported by FastPrefDPOTrainer; unset it")
    if name is None:
        types = list(args.loss_type)
        hparams = dict(
            beta=args.beta, loss_type=types, loss_weights=args.loss_weights, f_divergence_type=args.f_divergence_type,
            f_alpha_divergence_coef=args.f_alpha_divergence_coef, discopop_tau=args.discopop_tau,
        )
        if args.label_smoothing:
            if "sigmoid" in types:
                raise ValueError(
                    "fastpref: TRL >= 0.29 ignores `label_smoothing` for loss_type 'sigmoid', fastpref's 'dpo' would "
                    "apply it (cDPO). Set label_smoothing=0, or opt in explicitly with fastpref_loss='dpo' and "
                    "fastpref_loss_kwargs={'label_smoothing': ...}."
                )
            if set(types) & _SMOOTHED:
                hparams["label_smoothing"] = args.label_smoothing
        hparams.update(kwargs)
        name = "dpo"
    else:
        hparams = kwargs
        if args.beta != _TRL_DEFAULT_BETA and "beta" not in kwargs:
            warnings.warn(
                f"fastpref: DPOConfig.beta={args.beta} is not used by fastpref_loss={name!r}; pass "
                "fastpref_loss_kwargs={'beta': ...} (the loss's own default applies).",
                stacklevel=3,
            )
    if args.use_weighting:
        hparams["use_weighting"] = True
    plan = FusedLoss(name, hparams, chunk_size=getattr(args, "fastpref_chunk_size", None),
                     logits_budget=getattr(args, "fastpref_logits_budget", 0) or 0,
                     backend=getattr(args, "fastpref_backend", None))
    if plan.layout == "unpaired":
        raise ValueError(f"fastpref: loss {name!r} is unpaired (KTO-style); DPOTrainer batches are pairs or lists")
    if args.precompute_ref_log_probs and plan.spec.kl:
        raise ValueError(
            f"fastpref: loss {name!r} needs the reference distribution per token (KL), which precomputed "
            "reference log-probs cannot give; set precompute_ref_log_probs=False"
        )
    return plan


class FastPrefDPOTrainer(DPOTrainer):
    """``DPOTrainer`` whose loss is any fastpref loss, computed by the fused op (no logits).

    Drop-in: replace ``DPOTrainer``/``DPOConfig`` by ``FastPrefDPOTrainer``/``FastPrefDPOConfig``.
    With ``fastpref_loss=None`` the losses and metrics are TRL's (tested step by step); set
    ``fastpref_loss="mallows_dpo"`` (``"simpo"``, ``"tdpo2"``, ``"pro"``, ...) for others.

    The reference comes, as in TRL, from ``ref_model``, from the policy with its PEFT adapters
    disabled, or from ``precompute_ref_log_probs`` — computed by fastpref, with the summed reference
    token entropies MallowsPO needs stored next to the log-probs (``ref_chosen_entropy``,
    ``ref_rejected_entropy``). Not supported: ``ld_alpha``, MoE auxiliary losses, vision datasets.
    """

    _tag_names = ["trl", "dpo", "fastpref"]

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, **kwargs):
        if args is None:
            args = FastPrefDPOConfig(output_dir="fastpref-dpo")
        self.fastpref = loss_from_config(args)
        self._fastpref_columns = list(getattr(args, "fastpref_batch_columns", None) or [])
        if self.fastpref.wants_ref_entropy and args.precompute_ref_log_probs:
            self._fastpref_columns += ["ref_chosen_entropy", "ref_rejected_entropy"]
        self._fastpref_lists = self.fastpref.layout == "groups"
        if self._fastpref_lists and data_collator is None:
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            pad = getattr(tokenizer, "pad_token_id", None)
            pad = getattr(tokenizer, "eos_token_id", None) if pad is None else pad
            data_collator = ListwiseCollator(pad_token_id=pad or 0, max_length=args.max_length)
        super().__init__(model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs)
        if self._is_vision_dataset:
            raise ValueError("fastpref: vision datasets are not supported by FastPrefDPOTrainer")
        if self.aux_loss_enabled:
            raise NotImplementedError(
                "fastpref: MoE router auxiliary losses are not supported; set router_aux_loss_coef=0"
            )
        self._fastpref_install()
        self.data_collator = WithColumns(self.data_collator, self._fastpref_columns)

    # ---- setup ----

    def _fastpref_install(self) -> None:
        """Patch the policy (and reference) forwards; idempotent, also called by the precompute in __init__."""
        self._fastpref_transform = _head.logit_transform(self.model)
        _head.install(self.model)
        if self.ref_model is not None:
            _head.install(self.accelerator.unwrap_model(self.ref_model))

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if self._fastpref_lists:
            return prepare_listwise_dataset(dataset, processing_class, dataset_name)
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = list(self._fastpref_columns)
        if self._fastpref_lists:
            extra += ["completion_ids", "scores", "ref_logps"]
        self._signature_columns = list(dict.fromkeys(list(self._signature_columns) + extra))

    # ---- reference ----

    def _reference_context(self):
        """Adapter switch for a PEFT policy without a separate reference model (None otherwise)."""
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return None

    def _reference_sequences(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """Per-sequence reference statistics of one collated batch, as dataset columns."""
        model_kwargs, _ = split_batch(batch)
        labels = completion_labels(batch["input_ids"], batch["completion_mask"])
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                self.accelerator.autocast():
            stats = sequence_reference_stats(
                model, model_kwargs, labels, self._fastpref_transform, entropy=self.fastpref.wants_ref_entropy,
                chunk_size=self.fastpref.chunk_size, backend=self.fastpref.backend,
                adapter_context=self._reference_context(),
            )
        if self._fastpref_lists:
            # One row per prompt (padded with NaN to the longest list), so gathering keeps prompts whole.
            sizes = batch["group_sizes"].tolist()
            rows = torch.nn.utils.rnn.pad_sequence(list(stats["logps"].split(sizes)), batch_first=True,
                                                   padding_value=float("nan"))
            return {"ref_logps": self.accelerator.pad_across_processes(rows, dim=1, pad_index=float("nan"))}
        out = dict(zip(("ref_chosen_logps", "ref_rejected_logps"), stats["logps"].chunk(2)))
        if "entropy" in stats:
            out.update(zip(("ref_chosen_entropy", "ref_rejected_entropy"), stats["entropy"].chunk(2)))
            # for calibrating MallowsPO's c on per-token means (the collator may have truncated the responses)
            out.update(zip(("ref_chosen_tokens", "ref_rejected_tokens"), stats["num_tokens"].chunk(2)))
        return out

    def compute_ref_log_probs(self, model, inputs):
        """Summed reference log-probs of a padded pair batch, computed by fastpref: ``(chosen, rejected)``."""
        self._fastpref_install()
        _head.install(self.accelerator.unwrap_model(model))
        stats = self._reference_sequences(model, inputs)
        return stats["ref_chosen_logps"], stats["ref_rejected_logps"]

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """TRL's precompute, by fastpref, with the reference entropies when the loss needs them.

        Adds ``ref_chosen_logps`` / ``ref_rejected_logps`` (lists: ``ref_logps``) and, for MallowsPO,
        ``ref_chosen_entropy`` / ``ref_rejected_entropy`` (summed over completion tokens) to the dataset.
        """
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "`precompute_ref_log_probs=True` is not supported with IterableDataset. Please use a map-style "
                "Dataset or set `precompute_ref_log_probs=False`."
            )
        self._fastpref_install()
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        loader = self.accelerator.prepare(loader)
        if self.ref_model is None and self.is_deepspeed_enabled:
            # Before `train`, ZeRO-3 parameters are still partitioned: TRL's inference engine gathers them.
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        else:
            model = self.ref_model or self.model
        _head.install(self.accelerator.unwrap_model(model))
        columns = defaultdict(list)
        for batch in tqdm(loader, desc=f"fastpref: reference statistics of the {name} dataset",
                          disable=bool(os.environ.get("TQDM_DISABLE", ""))):
            stats = self.accelerator.gather_for_metrics(self._reference_sequences(model, batch))
            for key, value in stats.items():
                columns[key].append(value.float().cpu())
        for key, parts in columns.items():
            if key == "ref_logps":  # one list of K values per prompt
                values = [[x for x in row.tolist() if not math.isnan(x)] for part in parts for row in part]
            else:
                values = torch.cat(parts).tolist()
            if key in dataset.column_names:
                dataset = dataset.remove_columns(key)
            dataset = dataset.add_column(key, values)
        return dataset

    def _reference_head(self, model_kwargs: dict) -> dict:
        context = self._reference_context()
        if context is None and self.ref_model is None:
            raise ValueError(
                f"fastpref: loss {self.fastpref.loss!r} needs a reference forward on this batch but there is no "
                "reference model (precompute_ref_log_probs without a ref_model keeps only log-probs/entropies)"
            )
        # The reference forward may have been patched after accelerate wrapped it in autocast: enter it here.
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                self.accelerator.autocast():
            if context is not None:
                hidden, weight, bias = reference_head(self.model, model_kwargs, adapter_context=context)
            else:
                copy = self.is_fsdp_enabled or self.is_deepspeed_enabled
                hidden, weight, bias = reference_head(self.ref_model, model_kwargs, copy=copy)
        return {"ref_hidden": hidden, "ref_weight": weight, "ref_bias": bias}

    # ---- loss ----

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs, loss_inputs = split_batch(inputs)
        model_kwargs["use_cache"] = False
        labels = completion_labels(inputs["input_ids"], inputs["completion_mask"])
        ref = self._reference_head(model_kwargs) if self.fastpref.needs_ref_head(loss_inputs) else {}
        columns = {k: inputs[k] for k in self._fastpref_columns if k in inputs and k not in loss_inputs}
        fn = self.fastpref.closure(labels, self._fastpref_transform, **ref, **loss_inputs, **columns)
        output = model(**model_kwargs, fastpref_fn=fn)
        self._log_fastpref(mode, output.metrics, labels, inputs)
        if return_outputs:
            warnings.warn(
                "`return_outputs=True` recomputes the logits with an extra forward pass (the fused loss never "
                "builds them), as TRL's DPOTrainer does.",
                FutureWarning,
                stacklevel=2,
            )
            with torch.no_grad():
                return output.loss, model(**model_kwargs)
        return output.loss

    def _log_fastpref(self, mode: str, metrics: dict, labels: torch.Tensor, inputs: dict) -> None:
        for key, value in gather_metrics(metrics, token_counts(labels, self.fastpref.layout),
                                         self.accelerator.gather).items():
            self._metrics[mode][key].append(value)
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]


__all__ = ["FastPrefDPOConfig", "FastPrefDPOTrainer", "loss_from_config"]
