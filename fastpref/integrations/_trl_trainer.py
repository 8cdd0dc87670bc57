"""``FastPrefDPOTrainer``: TRL's ``DPOTrainer`` (>= 0.29) with the loss computed by fastpref's fused op.

Imported through :mod:`fastpref.integrations.trl`, which checks the TRL version first. Only the loss
changes: datasets, tokenisation, collation, the optimiser, gradient accumulation (TRL returns the
micro-batch mean over pairs and the HF ``Trainer`` divides by the accumulation steps; this trainer
returns the same quantity), logging and checkpointing are TRL's.

Per step: the reference backbone runs without gradient when the loss needs it (its hidden states and
head feed the same fused pass as the policy: no reference logits either), then the policy's forward
runs its backbone and :func:`fastpref.preference_loss` on the hidden states and the (gathered) head.
With ``padding_free`` / ``share_prompt`` both forwards (and the precompute) run the packed layout of
:mod:`fastpref.integrations.packing` and the loss reads its score view.

:class:`FusedTRLMixin` holds what this trainer and ``FastPrefKTOTrainer`` share.
"""

from __future__ import annotations

import dataclasses
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

from .. import _checks
from ..losses.pairwise import check_dpo_settings, weighted_loss_types
from ..losses.registry import get_loss
from . import _head, packing
from ._core import (
    FusedLoss,
    check_options,
    completion_labels,
    gather_metrics,
    metric_weights,
    reference_head,
    sequence_reference_stats,
    split_batch,
)
from .collators import ListwiseCollator, PackedCollator, WithColumns, prepare_listwise_dataset

_TRL_DEFAULT_BETA = 0.1
# TRL applies label_smoothing to these loss types only (>= 0.29); fastpref's "dpo" would also smooth "sigmoid".
_SMOOTHED = {"exo_pair", "robust", "aot", "aot_unpaired"}
# DPOConfig's loss fields (TRL 1.16) and their defaults. With fastpref_loss=None they are TRL's loss; a
# named loss reads its hyperparameters from fastpref_loss_kwargs alone, so there they must keep these values.
_TRL_LOSS_FIELDS = {
    "beta": None, "loss_type": ["sigmoid"], "loss_weights": None, "label_smoothing": 0.0,
    "f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5, "discopop_tau": 0.05, "use_weighting": False,
}
# Loss-affecting fields fastpref does not implement (the last two exist in older TRL of the supported range).
_UNSUPPORTED = {"ld_alpha": None, "rpo_alpha": None, "reference_free": False}
# Precomputed reference statistics a batch may carry. TRL reads them only with precompute_ref_log_probs=True
# (which computes them); otherwise its reference is the reference model, whatever columns the dataset holds.
_REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "ref_logps", "ref_chosen_entropy",
                      "ref_rejected_entropy")


@dataclass
class FastPrefOptions:
    """The level-1 options of the trainer configs (:func:`fastpref.token_stats`), checked at construction."""

    fastpref_chunk_size: int | None = field(default=None, metadata={"help": "Rows per fused chunk (None: automatic)."})
    fastpref_logits_budget: int = field(default=0, metadata={"help": "Bytes of chunk logits kept for backward."})
    fastpref_backend: str | None = field(
        default=None, metadata={"help": "Row-kernel backend (fastpref.backends(): torch/triton/cpp); None: by device."}
    )

    def fastpref_options(self) -> dict:
        """``chunk_size`` / ``logits_budget`` / ``backend`` for :class:`FusedLoss`, after checking them."""
        options = dict(chunk_size=self.fastpref_chunk_size, logits_budget=self.fastpref_logits_budget,
                       backend=self.fastpref_backend)
        check_options(**options, prefix="fastpref_")
        return options


@dataclass
class FastPrefDPOConfig(FastPrefOptions, DPOConfig):
    """``DPOConfig`` plus the fastpref fields; everything is checked when the config is built.

    Args:
        fastpref_loss: a fastpref loss name (:func:`fastpref.available_losses`). None (default) runs
            TRL's own loss settings through fastpref's ``"dpo"``: the same numbers as ``DPOTrainer``.
            Pairwise losses use TRL's preference datasets; list losses (``layout="groups"``: PRO, MPPO,
            LiPO, ...) take ``prompt`` + ``completions`` (+ ``scores``). Unpaired KTO:
            ``FastPrefKTOTrainer``.
        fastpref_loss_kwargs: the named loss's hyperparameters (a dict, or a JSON object string on the
            command line), checked against the loss: an unknown name is an error listing the accepted ones.
        fastpref_batch_columns: dataset columns handed to the loss per batch as tensors, e.g.
            ``["ties"]`` for TODO or ``["soft_labels"]`` for MMPO; each must be a dataset column and an
            input of the loss.
        fastpref_chunk_size, fastpref_logits_budget, fastpref_backend: level-1 options
            (:func:`fastpref.token_stats`).

    TRL's loss fields, with ``fastpref_loss=None`` (TRL's loss) / with a named loss:

    * ``beta``, ``loss_type``, ``loss_weights``, ``f_divergence_type``, ``f_alpha_divergence_coef``,
      ``discopop_tau``, ``use_weighting``: honoured as TRL does / must keep their defaults (an error
      names the ``fastpref_loss_kwargs`` key to use instead, or says the loss has no such setting).
      ``beta`` defaults to None here so that a value you set is never dropped: None means TRL's 0.1
      with TRL's loss, and the loss's own default (MallowsPO 10, SimPO 2, ...) with a named loss.
      Setting ``discopop_tau`` without loss type ``"discopop"``, or ``f_alpha_divergence_coef`` without
      ``f_divergence_type="alpha_divergence"``, is an error (TRL would ignore it).
    * ``label_smoothing``: applied as TRL does to ``exo_pair`` / ``robust`` / ``aot`` / ``aot_unpaired``;
      an error with ``"sigmoid"`` (TRL >= 0.29 ignores it there, fastpref's ``"dpo"`` would apply it as
      cDPO: use ``fastpref_loss="dpo", fastpref_loss_kwargs={"label_smoothing": ...}`` for cDPO) or
      with no loss type that uses it / must be 0.
    * ``fastpref_loss_kwargs`` with ``fastpref_loss=None``: may not repeat a DPOConfig loss field.
    * ``padding_free``: honoured (TRL 1.16 turns it off for DPO; here it packs the batch, see below).
    * ``ld_alpha`` (LD-DPO): not supported, an error when set.
    * ``sync_ref_model``, ``precompute_ref_log_probs``, ``precompute_ref_batch_size``, ``max_length``,
      ``pad_to_multiple_of``: honoured (precomputed reference log-probs cannot serve losses with a per-token
      KL such as TDPO: an error). List losses keep the start of each sequence: ``truncation_mode="keep_end"``
      is an error there, and examples whose prompt fills ``max_length`` are dropped, as TRL does for pairs.
      With ``precompute_ref_log_probs=False`` reference columns the dataset already holds (``ref_chosen_logps``,
      ``ref_logps``, ...) are ignored, as TRL does, with a warning: the reference model runs.
    * ``router_aux_loss_coef``: MoE auxiliary losses are not supported (an error when enabled).

    Batch layouts (:mod:`fastpref.integrations.packing`; the same loss, metrics and gradients as the
    padded batch, fewer positions through the backbone, for the policy, the reference and the precompute):

    * ``padding_free``: the batch's sequences packed into rows without padding, position ids restarting
      at each, a block-diagonal causal 4-D mask (``sdpa`` or ``eager`` attention; flash / flex attention
      and sliding-window models are refused). Rows hold at most ``packing_max_tokens`` positions (None:
      the longest sequence, or unit, of the batch — longer rows cost more attention per position);
      a sequence longer than the budget is an error (``max_length`` truncates first).
    * ``share_prompt``: each example laid out once, ``prompt · chosen · rejected`` (lists: the prompt and
      its K responses), each response attending to the prompt and to itself only, so each prompt runs
      once. Needs ``truncation_mode="keep_start"`` when ``max_length`` truncates. With
      ``padding_free`` the shared-prompt units are packed into rows.
    """

    _VALID_DICT_FIELDS = DPOConfig._VALID_DICT_FIELDS + ["fastpref_loss_kwargs"]

    beta: float | None = field(
        default=None,
        metadata={"help": "TRL's beta (None: 0.1). With a named fastpref_loss, pass beta in fastpref_loss_kwargs."},
    )
    fastpref_loss: str | None = field(default=None, metadata={"help": "fastpref loss name; None = TRL's loss_type."})
    fastpref_loss_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Hyperparameters of the named loss: a JSON object, e.g. '{\"beta\": 2.0}'."}
    )
    fastpref_batch_columns: list[str] | None = field(
        default=None, metadata={"help": "Dataset columns passed to the loss per batch (e.g. soft_labels)."}
    )
    padding_free: bool = field(
        default=False,
        metadata={"help": "Pack the batch's sequences into rows without padding (a block-diagonal 4-D mask; sdpa "
                          "or eager attention)."},
    )
    share_prompt: bool = field(
        default=False,
        metadata={"help": "Lay each example out once as prompt · chosen · rejected: the prompt runs once."},
    )
    packing_max_tokens: int | None = field(
        default=None, metadata={"help": "Positions per packed row (padding_free); None: the batch's longest unit."}
    )

    def __post_init__(self):
        if self.fastpref_loss is None and self.beta is None:
            self.beta = _TRL_DEFAULT_BETA
        super().__post_init__()  # parses a JSON string of fastpref_loss_kwargs, as TRL's dict fields
        loss_from_config(self)  # every check, before any dataset or model is touched
        packing_from_config(self)


def _accepts(loss: str, key: str) -> bool:
    """Whether loss ``loss`` takes the keyword ``key``."""
    return key in get_loss(loss).hyperparameters


def _check_trl_fields(args, name: str | None, types: list[str]) -> None:
    """Refuse the DPOConfig settings this run would not honour (see :class:`FastPrefDPOConfig`)."""
    for key, default in _UNSUPPORTED.items():
        value = getattr(args, key, default)
        if value != default:
            _checks.fail(key, f"is {value!r}, which FastPrefDPOTrainer does not support; leave it at {default!r}")
    if name is not None:
        for key, default in _TRL_LOSS_FIELDS.items():
            value = getattr(args, key, default)
            if value == default:
                continue
            if _accepts(name, key):
                shown = value[0] if key == "loss_type" and len(value) == 1 else value  # losses take a str too
                hint = f"pass fastpref_loss_kwargs={{{key!r}: {shown!r}}}"
            else:
                hint = f"loss {name!r} has no `{key}`; leave fastpref_loss=None to run TRL's loss settings"
            _checks.fail(key, f"is {value!r}: a setting of TRL's loss, which fastpref_loss={name!r} does not read; "
                              f"{hint}")
        return
    if args.label_smoothing:
        if "sigmoid" in types:
            _checks.fail("label_smoothing", "is ignored by TRL >= 0.29 for loss_type 'sigmoid', while fastpref's 'dpo' "
                                            "would apply it (cDPO). Set label_smoothing=0, or opt in explicitly with "
                                            "fastpref_loss='dpo' and fastpref_loss_kwargs={'label_smoothing': ...}.")
        if not set(types) & _SMOOTHED:
            _checks.fail("label_smoothing", f"is used by TRL only for loss_type in {sorted(_SMOOTHED)}; with "
                                            f"loss_type={types} it would be ignored: set label_smoothing=0")
    active = [name for name, _ in weighted_loss_types(types, args.loss_weights)]
    check_dpo_settings(active, f_divergence_type=args.f_divergence_type,
                       f_alpha_divergence_coef=args.f_alpha_divergence_coef, discopop_tau=args.discopop_tau)


def _loss_kwargs(args) -> dict:
    kwargs = getattr(args, "fastpref_loss_kwargs", None)
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        _checks.fail("fastpref_loss_kwargs", f"must be a dict (or a JSON object string), got {kwargs!r}")
    return dict(kwargs)


def check_reference_settings(args, *, uses_reference: bool, loss: str) -> None:
    """TRL's reference-model settings (DPO and KTO configs) refused where they would not act (TRL ignores them):
    TR-DPO's mixing without ``sync_ref_model``, a precompute batch size without the precompute, and syncing a
    reference the loss never reads."""
    defaults = {f.name: f.default for f in dataclasses.fields(type(args))}
    if not args.sync_ref_model:
        for key in ("ref_model_mixup_alpha", "ref_model_sync_steps"):
            if getattr(args, key) != defaults[key]:
                _checks.fail(key, f"={getattr(args, key)!r} acts only with sync_ref_model=True (TR-DPO), which is off")
    if args.precompute_ref_batch_size is not None and not args.precompute_ref_log_probs:
        _checks.fail("precompute_ref_batch_size", "acts only with precompute_ref_log_probs=True, which is off")
    if args.sync_ref_model and not uses_reference:
        _checks.fail("sync_ref_model", f"updates a reference model that loss {loss!r} never reads (it runs "
                                       "reference-free with these hyperparameters); set it to False")


def loss_from_config(args: DPOConfig) -> FusedLoss:
    """The :class:`FusedLoss` a (FastPref)DPOConfig asks for; settings it would not honour raise ``ValueError``."""
    name = getattr(args, "fastpref_loss", None)
    kwargs = _loss_kwargs(args)
    types = list(args.loss_type)
    if name is not None:
        get_loss(name)  # an unknown name first
    _check_trl_fields(args, name, types)
    if name is None:
        for key in kwargs:
            if key in _TRL_LOSS_FIELDS:
                _checks.fail("fastpref_loss_kwargs", f"sets {key!r}, a DPOConfig field: with fastpref_loss=None set "
                                                     f"DPOConfig.{key} instead")
        beta = _TRL_DEFAULT_BETA if args.beta is None else args.beta
        hparams = dict(
            beta=beta, loss_type=types, loss_weights=args.loss_weights, f_divergence_type=args.f_divergence_type,
            f_alpha_divergence_coef=args.f_alpha_divergence_coef, discopop_tau=args.discopop_tau,
        )
        if set(types) & _SMOOTHED and args.label_smoothing:
            hparams["label_smoothing"] = args.label_smoothing
        if args.use_weighting:
            hparams["use_weighting"] = True
        hparams.update(kwargs)
        name = "dpo"
    else:
        hparams = kwargs
    options = args.fastpref_options() if isinstance(args, FastPrefOptions) else {}
    plan = FusedLoss(name, hparams, **options)
    if plan.layout == "unpaired":
        _checks.fail("fastpref_loss", f"{name!r} is unpaired (KTO): use FastPrefKTOTrainer / FastPrefKTOConfig; "
                                      "DPOTrainer batches are pairs or lists")
    for column in batch_columns(args):
        if not _accepts(name, column):
            _checks.fail("fastpref_batch_columns", f"entry {column!r} is not an input of loss {name!r} (it takes: "
                                                   f"{', '.join(plan.spec.hyperparameters)}); it would be dropped")
    needs = plan.needs(dict.fromkeys(batch_columns(args), "per batch"))
    check_reference_settings(args, uses_reference=needs.run_ref_head, loss=name)
    if args.precompute_ref_log_probs:
        if needs.kl:
            _checks.fail("precompute_ref_log_probs", f"cannot serve loss {name!r}: it needs the reference "
                                                     "distribution per token (KL); set precompute_ref_log_probs=False")
        if needs.ref_logps is None and needs.ref_entropy is None:
            _checks.fail("precompute_ref_log_probs", f"would store nothing loss {name!r} uses (it runs without a "
                                                     "reference with these hyperparameters); set it to False")
    if plan.layout == "groups" and args.max_length is not None and args.truncation_mode != "keep_start":
        _checks.fail("truncation_mode", f"is {args.truncation_mode!r}, but list losses keep the start of each "
                                        "sequence: use truncation_mode='keep_start'")
    return plan


@dataclass(frozen=True)
class PackingOptions:
    """The batch layout a config asks for (:class:`FastPrefDPOConfig`'s ``padding_free`` / ``share_prompt``)."""

    padding_free: bool
    share_prompt: bool
    max_tokens: int | None

    @property
    def setting(self) -> str:
        """The option to name in errors."""
        return "share_prompt" if self.share_prompt else "padding_free"


def packing_from_config(args) -> PackingOptions | None:
    """The packed layout of a (FastPref)DPOConfig, or None for TRL's padded batches; checked."""
    padding_free, share = bool(getattr(args, "padding_free", False)), bool(getattr(args, "share_prompt", False))
    max_tokens = getattr(args, "packing_max_tokens", None)
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            _checks.fail("packing_max_tokens", f"must be None or a positive int, got {max_tokens!r}")
        if not padding_free:
            _checks.fail("packing_max_tokens", "is the row budget of padding_free=True, which is off")
    if share and args.max_length is not None and args.truncation_mode != "keep_start":
        _checks.fail("share_prompt", f"needs truncation_mode='keep_start' (got {args.truncation_mode!r}): 'keep_end' "
                                     "cuts the prompt of each sequence differently, so there is none to share")
    if not (padding_free or share):
        return None
    return PackingOptions(padding_free, share, max_tokens)


def batch_columns(args) -> list[str]:
    """``fastpref_batch_columns`` of a config, checked to be a list of names."""
    columns = getattr(args, "fastpref_batch_columns", None) or []
    if isinstance(columns, str) or not all(isinstance(c, str) for c in columns):
        _checks.fail("fastpref_batch_columns", f"must be a list of column names, got {columns!r}")
    return list(columns)


def dataset_columns(dataset) -> list[str]:
    """Column names of a ``datasets`` (Iterable)Dataset (from its first example when not declared)."""
    names = getattr(dataset, "column_names", None)
    return list(names) if names is not None else list(next(iter(dataset)).keys())


def check_columns(columns: list[str], **datasets) -> None:
    """Each of ``columns`` must be a column of every dataset given (``train_dataset=``, ``eval_dataset=``)."""
    for arg, dataset in datasets.items():
        parts = dataset.items() if isinstance(dataset, dict) else [(None, dataset)]
        for split, part in parts:
            if part is None:
                continue
            names = dataset_columns(part)
            for column in columns:
                if column not in names:
                    where = arg if split is None else f"{arg}[{split!r}]"
                    _checks.fail("fastpref_batch_columns", f"entry {column!r} is not a column of {where} "
                                                           f"(columns: {names})")


class FusedTRLMixin:
    """What the fastpref TRL trainers share; mix in before TRL's trainer (``self.fastpref`` is the loss).

    The patched forwards (:func:`fastpref.integrations._head.install`), the reference model or the
    policy with its adapters disabled, the precompute of reference statistics by fastpref, and logging
    the metrics under TRL's names with TRL's cross-rank averages.
    """

    fastpref: FusedLoss
    _fastpref_packing: PackingOptions | None = None

    def _fastpref_install(self) -> None:
        """Patch the policy (and reference) forwards; idempotent, also called by the precompute in __init__."""
        self._fastpref_transform = _head.logit_transform(self.model)
        _head.install(self.model)
        if self.ref_model is not None:
            _head.install(self.accelerator.unwrap_model(self.ref_model))
            _head.check_reference(self.model, self.accelerator.unwrap_model(self.ref_model))

    # ---- batch layout ----

    def _fastpref_collator(self, collator):
        """``collator`` laying its batches out as the config asks (unchanged for TRL's padded batches)."""
        options = self._fastpref_packing
        if options is None or isinstance(collator, PackedCollator):
            return collator
        return PackedCollator(collator, padding_free=options.padding_free, share_prompt=options.share_prompt,
                              max_tokens=options.max_tokens, pad_to_multiple_of=self.args.pad_to_multiple_of)

    def _model_kwargs(self, model, batch: dict) -> dict:
        """The backbone's keyword arguments for ``batch``: TRL's padded tensors, or a packed batch's
        ``input_ids``, position ids and 4-D mask (any other model input is refused: the layout cannot carry it)."""
        model_kwargs, _ = split_batch(batch, self.fastpref)
        if "score_index" not in batch:
            return model_kwargs
        extra = sorted(set(model_kwargs) - set(packing.PACKED_KEYS) - {"num_tokens"})
        setting = self._fastpref_packing.setting if self._fastpref_packing else "padding_free"
        if extra:
            _checks.fail(setting, f"lays out input_ids only; the batch also holds model inputs {extra}")
        body = self.accelerator.unwrap_model(model)
        return packing.model_inputs(batch, body.config, body.get_input_embeddings().weight.dtype, setting)

    @staticmethod
    def _scored(model, batch: dict):
        """``model`` (patched by :func:`_head.install`) handing its ``fastpref_fn`` the score view of a packed
        batch (:func:`packing.score_view`); ``model`` itself for a padded batch."""
        if "score_index" not in batch:
            return model

        def forward(*, fastpref_fn, **kwargs):
            return model(**kwargs, fastpref_fn=lambda h, w, b: fastpref_fn(packing.score_view(h, batch)[0], w, b))

        return forward

    @staticmethod
    def _labels(batch: dict) -> torch.Tensor:
        """Labels aligned with the (viewed) hidden states: a packed batch's score view, else TRL's rows shifted."""
        if "score_index" in batch:
            return batch["score_labels"]
        return completion_labels(batch["input_ids"], batch["completion_mask"])

    # ---- reference ----

    def _reference_context(self):
        """Adapter switch for a PEFT policy without a separate reference model (None otherwise)."""
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return None

    def _sequence_logps(self, model, model_kwargs: dict, labels: torch.Tensor, *, entropy: bool = False,
                        adapter_context=None) -> dict[str, torch.Tensor]:
        """Summed log-probs (and entropies) per sequence of ``model`` without gradient (see ``sequence_reference_stats``)."""
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                self.accelerator.autocast():
            return sequence_reference_stats(
                model, model_kwargs, labels, self._fastpref_transform, entropy=entropy,
                chunk_size=self.fastpref.chunk_size, backend=self.fastpref.backend, adapter_context=adapter_context,
            )

    def _reference_model(self):
        """``(model, adapter_context)`` that computes the reference during training."""
        context = self._reference_context()
        if context is not None:
            return self.model, context
        if self.ref_model is None:
            raise ValueError(
                f"fastpref: loss {self.fastpref.loss!r} needs a reference forward on this batch but there is no "
                "reference model (precompute_ref_log_probs without a ref_model keeps only the precomputed columns)"
            )
        return self.ref_model, None

    def _reference_head(self, model_kwargs: dict, batch: dict | None = None) -> dict:
        """``ref_hidden`` / ``ref_weight`` / ``ref_bias`` for the fused pass (the policy's head under PEFT);
        the score view of a packed ``batch``."""
        model, context = self._reference_model()
        model = self._scored(model, batch or {})
        # The reference forward may have been patched after accelerate wrapped it in autocast: enter it here.
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                self.accelerator.autocast():
            if context is not None:
                hidden, weight, bias = reference_head(model, model_kwargs, adapter_context=context)
            else:
                copy = self.is_fsdp_enabled or self.is_deepspeed_enabled
                hidden, weight, bias = reference_head(model, model_kwargs, copy=copy)
        return {"ref_hidden": hidden, "ref_weight": weight, "ref_bias": bias}

    def _reference_sequences(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """Per-example reference statistics of one collated batch, as dataset columns (per trainer)."""
        raise NotImplementedError

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """TRL's precompute of reference statistics, by fastpref (columns: :meth:`_reference_sequences`).

        Columns of 2-D values hold one NaN-padded list per example (list losses' K responses).
        """
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "`precompute_ref_log_probs=True` is not supported with IterableDataset. Please use a map-style "
                "Dataset or set `precompute_ref_log_probs=False`."
            )
        self._fastpref_install()
        # The columns fastpref adds per batch do not exist yet: collate with the trainer's own collator,
        # in the layout of training.
        collator = self.data_collator.collator if isinstance(self.data_collator, WithColumns) else self.data_collator
        collator = self._fastpref_collator(collator)
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator, shuffle=False,
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
            if parts[0].dim() == 2:  # one list per example
                values = [[x for x in row.tolist() if not math.isnan(x)] for part in parts for row in part]
            else:
                values = torch.cat(parts).tolist()
            if key in dataset.column_names:
                dataset = dataset.remove_columns(key)
            dataset = dataset.add_column(key, values)
        return dataset

    # ---- logging ----

    def _log_fastpref(self, mode: str, metrics: dict[str, float], inputs: dict) -> None:
        """Append gathered metrics (:func:`gather_metrics`) and TRL's running token count."""
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        if mode == "train":
            # TRL's count: the real tokens of the padded batch (a packed batch carries it as num_tokens)
            tokens = inputs["num_tokens"] if "num_tokens" in inputs else inputs["attention_mask"].sum()
            tokens = self.accelerator.gather_for_metrics(tokens).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def _recomputed_outputs(self, model, model_kwargs: dict):
        packed = "" if self._fastpref_packing is None else (
            f" With {self._fastpref_packing.setting}=True they are laid out as the packed batch's rows (as are "
            "its input_ids, which TRL hands to compute_metrics as labels), not as TRL's [chosen; rejected] rows.")
        warnings.warn(
            "`return_outputs=True` recomputes the logits with an extra forward pass (the fused loss never "
            f"builds them), as TRL's trainers do.{packed}",
            FutureWarning,
            stacklevel=3,
        )
        with torch.no_grad():
            return model(**model_kwargs)


class FastPrefDPOTrainer(FusedTRLMixin, DPOTrainer):
    """``DPOTrainer`` whose loss is any fastpref loss, computed by the fused op (no logits).

    Drop-in: replace ``DPOTrainer``/``DPOConfig`` by ``FastPrefDPOTrainer``/``FastPrefDPOConfig``.
    With ``fastpref_loss=None`` the losses and metrics are TRL's (tested step by step); set
    ``fastpref_loss="mallows_dpo"`` (``"simpo"``, ``"tdpo2"``, ``"pro"``, ...) for others.

    The reference comes, as in TRL, from ``ref_model``, from the policy with its PEFT adapters
    disabled, or from ``precompute_ref_log_probs`` — computed by fastpref, with the summed reference
    token entropies MallowsPO needs stored next to the log-probs (``ref_chosen_entropy``,
    ``ref_rejected_entropy``). ``padding_free`` and ``share_prompt`` lay batches out with fewer
    backbone positions and the same numbers. Not supported: ``ld_alpha``, MoE auxiliary losses,
    vision datasets (see :class:`FastPrefDPOConfig` for how every TRL field is treated).
    """

    _tag_names = ["trl", "dpo", "fastpref"]

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, **kwargs):
        if args is None:
            args = FastPrefDPOConfig(output_dir="fastpref-dpo")
        self.fastpref = loss_from_config(args)
        self._fastpref_packing = packing_from_config(args)
        self._fastpref_columns = batch_columns(args)
        # before TRL's preprocessing and the reference precompute
        check_columns(self._fastpref_columns, train_dataset=train_dataset, eval_dataset=eval_dataset)
        # what the reference statistics (precomputed or not) must hold for this loss and these columns
        self._fastpref_needs = self.fastpref.needs(dict.fromkeys(self._fastpref_columns, "per batch"))
        if self._fastpref_needs.ref_entropy is not None and args.precompute_ref_log_probs:
            self._fastpref_columns += ["ref_chosen_entropy", "ref_rejected_entropy"]
        self._fastpref_lists = self.fastpref.layout == "groups"
        if self._fastpref_lists and data_collator is None:
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            pad = 0
            if tokenizer is not None:  # TRL's choice of pad token, checked as TRL checks it
                token = args.pad_token or tokenizer.pad_token or tokenizer.eos_token
                if token not in tokenizer.get_vocab():
                    _checks.fail("pad_token", f"({token!r}) is not in the vocabulary of the processing_class")
                pad = tokenizer.convert_tokens_to_ids(token)
            data_collator = ListwiseCollator(pad_token_id=pad, max_length=args.max_length,
                                             pad_to_multiple_of=args.pad_to_multiple_of)
        padding_free = args.padding_free
        args.padding_free = False  # TRL 1.16 warns that it is unavailable and turns it off; the collator does it
        try:
            super().__init__(model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class,
                             **kwargs)
        finally:
            args.padding_free = padding_free
        if self._is_vision_dataset:
            _checks.fail("train_dataset", "is a vision dataset, which FastPrefDPOTrainer does not support")
        if self._fastpref_packing is not None:
            for body in (self.model, self.ref_model):
                if body is not None:
                    packing.check_attention(self.accelerator.unwrap_model(body).config, self._fastpref_packing.setting)
        if self.aux_loss_enabled:
            _checks.fail("router_aux_loss_coef", "(MoE router auxiliary losses) is not supported; set it to 0")
        self._fastpref_install()
        self.data_collator = WithColumns(self._fastpref_collator(self.data_collator), self._fastpref_columns)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if self._fastpref_lists:
            return prepare_listwise_dataset(dataset, processing_class, dataset_name, max_length=args.max_length,
                                            num_proc=args.dataset_num_proc)
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = list(self._fastpref_columns)
        if self._fastpref_lists:
            extra += ["completion_ids", "scores", "ref_logps"]
        self._signature_columns = list(dict.fromkeys(list(self._signature_columns) + extra))

    # ---- reference ----

    def _reference_sequences(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """Per-example reference statistics of one collated batch, as dataset columns."""
        model_kwargs, labels = self._model_kwargs(model, batch), self._labels(batch)
        entropy = self._fastpref_needs.ref_entropy is not None
        stats = self._sequence_logps(self._scored(model, batch), model_kwargs, labels, entropy=entropy,
                                     adapter_context=self._reference_context())
        if self._fastpref_lists:
            # One row per prompt (padded with NaN to the longest list), so gathering keeps prompts whole.
            sizes = batch["group_sizes"].tolist()
            rows = torch.nn.utils.rnn.pad_sequence(list(stats["logps"].split(sizes)), batch_first=True,
                                                   padding_value=float("nan"))
            return {"ref_logps": self.accelerator.pad_across_processes(rows, dim=1, pad_index=float("nan"))}
        out = {}
        if self._fastpref_needs.ref_logps is not None:
            out.update(zip(("ref_chosen_logps", "ref_rejected_logps"), stats["logps"].chunk(2)))
        if entropy:
            out.update(zip(("ref_chosen_entropy", "ref_rejected_entropy"), stats["entropy"].chunk(2)))
            # for calibrating MallowsPO's c on per-token means (the collator may have truncated the responses)
            out.update(zip(("ref_chosen_tokens", "ref_rejected_tokens"), stats["num_tokens"].chunk(2)))
        return out

    def compute_ref_log_probs(self, model, inputs):
        """Summed reference log-probs of a pair batch (padded or packed), by fastpref: ``(chosen, rejected)``."""
        self._fastpref_install()
        _head.install(self.accelerator.unwrap_model(model))
        model_kwargs, labels = self._model_kwargs(model, inputs), self._labels(inputs)
        logps = self._sequence_logps(self._scored(model, inputs), model_kwargs, labels,
                                     adapter_context=self._reference_context())["logps"]
        return logps.chunk(2)

    # ---- loss ----

    def _reference_inputs(self, loss_inputs: dict) -> dict:
        """``loss_inputs`` without the dataset's reference columns unless ``precompute_ref_log_probs`` made them:
        as in TRL, the reference is then the reference model (or the policy without its adapters)."""
        if self.precompute_ref_logps:
            return loss_inputs
        stale = sorted(set(loss_inputs) & set(_REFERENCE_COLUMNS))
        if stale and not getattr(self, "_fastpref_warned_stale", False):
            self._fastpref_warned_stale = True
            warnings.warn(f"fastpref: the batches hold reference columns {stale}, which precompute_ref_log_probs=False "
                          "ignores (as TRL does): the reference model runs instead. Set precompute_ref_log_probs=True "
                          "to train from precomputed reference statistics (it recomputes them).", UserWarning,
                          stacklevel=3)
        return {k: v for k, v in loss_inputs.items() if k not in _REFERENCE_COLUMNS}

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        _, loss_inputs = split_batch(inputs, self.fastpref)
        loss_inputs = self._reference_inputs(loss_inputs)
        model_kwargs = {**self._model_kwargs(model, inputs), "use_cache": False}
        labels = self._labels(inputs)
        ref = self._reference_head(model_kwargs, inputs) if self.fastpref.needs(loss_inputs).run_ref_head else {}
        fn = self.fastpref.closure(labels, self._fastpref_transform, **ref, **loss_inputs)
        output = self._scored(model, inputs)(**model_kwargs, fastpref_fn=fn)
        weights = metric_weights(self.fastpref, labels, loss_inputs)
        self._log_fastpref(mode, gather_metrics(output.metrics, weights, self.accelerator.gather), inputs)
        if return_outputs:
            return output.loss, self._recomputed_outputs(model, model_kwargs)
        return output.loss


__all__ = ["FastPrefDPOConfig", "FastPrefDPOTrainer", "FastPrefOptions", "FusedTRLMixin", "PackingOptions",
           "loss_from_config", "packing_from_config"]
