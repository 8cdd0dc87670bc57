"""TRL integration: ``FastPrefDPOTrainer`` / ``FastPrefKTOTrainer`` (TRL >= 0.29) and a ``dpo_loss`` mixin for
legacy TRL (0.9 - 0.28).

Importing this module imports neither TRL nor transformers; the names below load them on first use,
after checking the installed TRL version:

* :class:`FastPrefDPOTrainer`, :class:`FastPrefDPOConfig` — TRL 0.29 up to (not including) 2.0
  (tested with 1.16): the loss of ``DPOTrainer`` computed by fastpref's fused op, any fastpref loss
  by name. One-line change::

      from fastpref.integrations.trl import FastPrefDPOConfig as DPOConfig, FastPrefDPOTrainer as DPOTrainer

* :class:`FastPrefKTOTrainer`, :class:`FastPrefKTOConfig` — the same for ``KTOTrainer`` (unpaired
  desirable / undesirable data): TRL's KTO losses and metrics from fastpref's fused ``"kto"``::

      from fastpref.integrations.trl import FastPrefKTOConfig as KTOConfig, FastPrefKTOTrainer as KTOTrainer

* :class:`FastPrefLegacyDPOMixin` — TRL 0.9 - 0.28 (``DPOTrainer.dpo_loss`` era, LLaMA-Factory's pin):
  ``class MyTrainer(FastPrefLegacyDPOMixin, DPOTrainer)`` runs MallowsPO & co. from the trainer's
  own per-sequence log-probs.
* :func:`reference_columns` — summed reference log-probs and token entropies of a tokenised pair
  dataset, for precomputing MallowsPO's dispersion anywhere.
* :func:`train_demo` — a small end-to-end run, what ``python -m fastpref demo`` calls.
"""

from __future__ import annotations

import importlib.metadata

NEW_RANGE = ("0.29.0", "2.0.0")  # the rewritten DPOTrainer (_compute_loss + fused LM head); tested: 1.16
LEGACY_RANGE = ("0.9.0", "0.29.0")  # DPOTrainer.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected)

_NEW = ("FastPrefDPOTrainer", "FastPrefDPOConfig", "loss_from_config")
_KTO = ("FastPrefKTOTrainer", "FastPrefKTOConfig", "kto_loss_from_config")
_LEGACY = ("FastPrefLegacyDPOMixin", "completion_lengths")


def trl_version() -> str:
    """The installed TRL version (ImportError with an install hint when TRL is missing)."""
    try:
        return importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError as err:
        raise ImportError("fastpref.integrations.trl needs TRL: pip install 'fastpref[trl]'") from err


def _parse(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (3 - len(parts)))


def _in(version: str, bounds: tuple[str, str]) -> bool:
    return _parse(bounds[0]) <= _parse(version) < _parse(bounds[1])


def check_trl(kind: str = "trainer") -> str:
    """Raise a clear ``RuntimeError`` unless the installed TRL supports ``kind`` ("trainer" or "legacy")."""
    version = trl_version()
    if kind == "trainer" and not _in(version, NEW_RANGE):
        hint = ("use FastPrefLegacyDPOMixin (dpo_loss override) with this TRL, or upgrade to TRL >= 0.29"
                if _parse(version) < _parse(NEW_RANGE[0]) else "pin trl<2 (tested: 1.16)")
        raise RuntimeError(f"fastpref: FastPrefDPOTrainer supports TRL {NEW_RANGE[0]} to <{NEW_RANGE[1]}, found "
                           f"{version}; {hint}")
    if kind == "legacy" and not _in(version, LEGACY_RANGE):
        raise RuntimeError(f"fastpref: FastPrefLegacyDPOMixin targets TRL {LEGACY_RANGE[0]} to <{LEGACY_RANGE[1]} "
                           f"(DPOTrainer.dpo_loss), found {version}; with TRL >= 0.29 use FastPrefDPOTrainer")
    return version


def __getattr__(name: str):
    if name in _NEW:
        check_trl("trainer")
        from . import _trl_trainer

        return getattr(_trl_trainer, name)
    if name in _KTO:
        check_trl("trainer")
        from . import _trl_kto

        return getattr(_trl_kto, name)
    if name in _LEGACY:
        from . import _trl_legacy  # no TRL import: the mixin also works on a look-alike trainer

        return getattr(_trl_legacy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def reference_columns(model, dataset, *, pad_token_id: int, batch_size: int = 8, entropy: bool = True,
                      chunk_size: int | None = None, backend: str | None = None):
    """``dataset`` with ``ref_chosen_logps``, ``ref_rejected_logps`` (+ ``ref_*_entropy``) from ``model``.

    ``dataset`` holds tokenised pairs: ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` (TRL >= 0.29)
    or ``prompt_input_ids`` / ``chosen_input_ids`` / ``rejected_input_ids`` (TRL 0.12 - 0.28). Values are
    SUMMED over completion tokens (TRL's precompute convention; MallowsPO divides by the lengths). Runs
    on ``model``'s device without gradient, one process. A legacy trainer's collator must pass the new
    columns on (wrap it in :class:`fastpref.integrations.collators.WithColumns`, keep
    ``remove_unused_columns=False``).
    """
    import torch

    from . import _head
    from ._core import check_options, completion_labels, sequence_reference_stats

    check_options(chunk_size, 0, backend)
    device = next(model.parameters()).device
    _head.install(model)
    transform = _head.logit_transform(model)
    columns: dict[str, list[float]] = {}
    was_training = model.training
    model.eval()
    legacy = "prompt_input_ids" in dataset.column_names
    prompt_key, chosen_key, rejected_key = (
        ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids") if legacy
        else ("prompt_ids", "chosen_ids", "rejected_ids")
    )
    try:
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start:start + batch_size]
            prompts, chosen, rejected = rows[prompt_key], rows[chosen_key], rows[rejected_key]
            seqs = [p + c for p, c in zip(prompts, chosen)] + [p + r for p, r in zip(prompts, rejected)]
            masks = [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, chosen)]
            masks += [[0] * len(p) + [1] * len(r) for p, r in zip(prompts, rejected)]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [pad_token_id] * (width - len(s)) for s in seqs], device=device)
            attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
            completion = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device)
            stats = sequence_reference_stats(
                model, {"input_ids": ids, "attention_mask": attention}, completion_labels(ids, completion), transform,
                entropy=entropy, chunk_size=chunk_size, backend=backend,
            )
            for key, values in (("logps", stats["logps"]), ("entropy", stats.get("entropy"))):
                if values is None:
                    continue
                chosen, rejected = values.float().cpu().chunk(2)
                columns.setdefault(f"ref_chosen_{key}", []).extend(chosen.tolist())
                columns.setdefault(f"ref_rejected_{key}", []).extend(rejected.tolist())
    finally:
        model.train(was_training)
    for key, values in columns.items():
        if key in dataset.column_names:
            dataset = dataset.remove_columns(key)
        dataset = dataset.add_column(key, values)
    return dataset


def train_demo(model, tokenizer, train_dataset, *, loss: str = "mallows_dpo", loss_kwargs: dict | None = None,
               max_steps: int = 40, learning_rate: float = 1e-3, batch_size: int = 4, seed: int = 0,
               output_dir: str | None = None, precompute_ref_log_probs: bool = True, ref_model=None,
               calibrate_dispersion: bool = False, **config):
    """Train ``model`` for ``max_steps`` with :class:`FastPrefDPOTrainer`; returns ``(trainer, log_history)``.

    ``train_dataset``: a ``datasets.Dataset`` with ``prompt`` / ``chosen`` / ``rejected`` text columns
    (``tokenizer`` tokenises them; it needs an EOS token). With ``precompute_ref_log_probs`` (default)
    the reference log-probs and entropies are computed once by fastpref before training, from the
    initial model, and no reference model is kept; otherwise a frozen copy of ``model`` is the reference
    (or pass ``ref_model``). ``calibrate_dispersion`` (MallowsPO with precomputed entropies) sets
    ``dispersion_c`` so that the dataset mean of psi is 1 (:func:`fastpref.calibrate_dispersion_c`); a
    random-init model is nearly uniform, so the official c = 0.29 makes psi ~ 0 there.
    ``config`` overrides :class:`FastPrefDPOConfig` fields (bf16 defaults to a bf16-capable GPU only).
    Logs every step.
    """
    import copy
    import tempfile

    import torch

    check_trl("trainer")
    from .._checks import fail
    from ..losses.registry import get_loss
    from ._trl_trainer import FastPrefDPOConfig, FastPrefDPOTrainer

    if calibrate_dispersion and ("dispersion_c" not in get_loss(loss).hyperparameters or not precompute_ref_log_probs):
        fail("calibrate_dispersion", f"sets MallowsPO's `dispersion_c` from precomputed reference entropies: it needs "
                                     f"a MallowsPO loss and precompute_ref_log_probs=True (got loss={loss!r}, "
                                     f"precompute_ref_log_probs={precompute_ref_log_probs})")
    if calibrate_dispersion and "dispersion_c" in (loss_kwargs or {}):
        fail("calibrate_dispersion", "would replace the `dispersion_c` given in loss_kwargs: pass one of them")
    # the arguments above set these config fields: the same field in **config would silently win
    named = {"max_steps": "max_steps", "learning_rate": "learning_rate", "per_device_train_batch_size": "batch_size",
             "seed": "seed", "output_dir": "output_dir", "fastpref_loss": "loss", "fastpref_loss_kwargs": "loss_kwargs",
             "precompute_ref_log_probs": "precompute_ref_log_probs"}
    for field, argument in named.items():
        if field in config:
            fail(field, f"is set by train_demo's `{argument}` argument: pass that instead")

    cuda = torch.cuda.is_available()
    settings = dict(
        output_dir=output_dir or tempfile.mkdtemp(prefix="fastpref-demo-"), max_steps=max_steps,
        learning_rate=learning_rate, per_device_train_batch_size=batch_size, logging_steps=1, save_strategy="no",
        report_to="none", seed=seed, fastpref_loss=loss, fastpref_loss_kwargs=dict(loss_kwargs or {}),
        precompute_ref_log_probs=precompute_ref_log_probs, use_cpu=not cuda, disable_tqdm=True,
        bf16=cuda and torch.cuda.is_bf16_supported(),
    )
    settings.update(config)
    args = FastPrefDPOConfig(**settings)
    if ref_model is None and not precompute_ref_log_probs:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    trainer = FastPrefDPOTrainer(model, ref_model=ref_model, args=args, train_dataset=train_dataset,
                                 processing_class=tokenizer)
    if calibrate_dispersion:
        trainer.fastpref.hparams["dispersion_c"] = dispersion_c_from_columns(trainer.train_dataset,
                                                                             trainer.model.config.vocab_size)
    trainer.train()
    return trainer, trainer.state.log_history


def dispersion_c_from_columns(dataset, vocab_size: int) -> float:
    """MallowsPO's ``c`` making the mean psi 1, from precomputed ``ref_*_entropy`` columns of a TRL pair dataset.

    The columns are summed over completion tokens; the per-token means divide by the tokens that were
    scored (``ref_chosen_tokens`` / ``ref_rejected_tokens``, stored by the same precompute, so responses
    the collator truncated count only their kept tokens), as the official estimator does.
    """
    import torch

    from ..losses import calibrate_dispersion_c

    chosen = torch.tensor(dataset["ref_chosen_entropy"]) / torch.tensor(dataset["ref_chosen_tokens"])
    rejected = torch.tensor(dataset["ref_rejected_entropy"]) / torch.tensor(dataset["ref_rejected_tokens"])
    return calibrate_dispersion_c(chosen, rejected, vocab_size=vocab_size)


__all__ = [
    "FastPrefDPOConfig", "FastPrefDPOTrainer", "FastPrefKTOConfig", "FastPrefKTOTrainer", "FastPrefLegacyDPOMixin",
    "check_trl", "completion_lengths", "dispersion_c_from_columns", "kto_loss_from_config", "loss_from_config",
    "reference_columns", "train_demo", "trl_version",
]
