"""Drop-in integrations with training pipelines; each imports its framework only when used.

* :mod:`fastpref.integrations.trl` — ``FastPrefDPOTrainer`` / ``FastPrefDPOConfig`` and
  ``FastPrefKTOTrainer`` / ``FastPrefKTOConfig`` for TRL >= 0.29, ``FastPrefLegacyDPOMixin``
  (``dpo_loss`` override) for TRL 0.9 - 0.28, ``train_demo``.
* :mod:`fastpref.integrations.hf` — ``FastPrefTrainerMixin`` / ``fastpref_compute_loss`` for the plain
  Hugging Face ``Trainer`` with your own preference collator.
* :mod:`fastpref.integrations.collators` — ``ListwiseCollator`` (K responses per prompt), ``WithColumns``.

Distributed heads are handled inside the model's forward (:mod:`fastpref.integrations._head`): FSDP /
FSDP2 (``DTensor``) and DeepSpeed ZeRO-3 heads are gathered for the fused op and their gradients reach
the engine. Vocabulary-parallel heads: :class:`fastpref.ops.vocab_parallel.VocabParallel`.
"""

import importlib

_SUBMODULES = ("trl", "hf", "collators")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_SUBMODULES)
