"""Collators for the trainer integrations: extra per-example columns, and K responses per prompt.

Plain torch; the optional ``processing_class`` is any Hugging Face tokenizer.

* :class:`WithColumns` wraps a pair collator (TRL's ``DataCollatorForPreference``, or yours) and adds
  per-example dataset columns as tensors: precomputed reference entropies, TODO's ``ties``, MMPO's
  ``soft_labels`` ...
* :class:`ListwiseCollator` batches prompts with K scored responses each into the ``"groups"`` layout
  of :func:`fastpref.preference_loss`: every prompt's responses in consecutive rows,
  ``group_sizes [B]``, ``scores [S]`` and (precomputed) ``ref_logps [S]`` per response.
* :class:`PackedCollator` lays the batches of either (or of any padded pair collator) out padding-free
  and / or with a shared prompt (:mod:`fastpref.integrations.packing`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from . import packing


class WithColumns:
    """``collator(examples)`` plus ``torch.tensor([example[k] ...])`` for each column ``k``.

    A column missing from the examples is an error naming it (a misspelt column would otherwise
    silently leave the loss without its input).
    """

    def __init__(self, collator, columns):
        self.collator = collator.collator if isinstance(collator, WithColumns) else collator
        self.columns = list(dict.fromkeys(columns))

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        for key in self.columns:
            if key in batch:
                continue
            if key not in examples[0]:
                raise ValueError(f"fastpref: batch column {key!r} is missing from the examples (keys: "
                                 f"{sorted(examples[0])}); keep it in the dataset (remove_unused_columns keeps "
                                 "the trainer's columns)")
            batch[key] = torch.tensor([example[key] for example in examples])
        return batch

    def __getattr__(self, name):  # pad_token_id, max_length, ... of the wrapped collator
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)


def _pad(rows: list[list[int]], value: int, multiple: int | None = None) -> torch.Tensor:
    width = max(len(r) for r in rows)
    if multiple:
        width = -(-width // multiple) * multiple
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


@dataclass
class ListwiseCollator:
    """Prompts with K responses each -> the ``"groups"`` layout (right padding).

    Each example holds ``prompt_ids`` (list of ints) and ``completion_ids`` (K lists of ints; K may
    vary per prompt, at least 2), optionally ``scores`` (K floats, higher is better; without them the
    responses are taken as ranked best first) and ``ref_logps`` (K precomputed summed reference
    log-probs). Output: ``input_ids``, ``attention_mask``, ``completion_mask`` ``[S, T]`` with
    ``S = sum K``, ``group_sizes [B]``, and ``scores`` / ``ref_logps`` ``[S]`` when given.
    ``max_length`` truncates each prompt+response sequence (keeping its start); a response left without
    any token (empty, or cut off entirely) is an error: drop such examples first
    (:func:`prepare_listwise_dataset` drops those whose prompt fills ``max_length``, as TRL does for pairs).
    ``pad_to_multiple_of`` rounds the padded length up.
    """

    pad_token_id: int = 0
    max_length: int | None = None
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, completion, sizes = [], [], []
        for index, example in enumerate(examples):
            prompt = list(example["prompt_ids"])
            responses = example["completion_ids"]
            if len(responses) < 2:
                raise ValueError(f"fastpref: a list example needs at least 2 responses, got {len(responses)}")
            sizes.append(len(responses))
            for response in responses:
                seq, mask = prompt + list(response), [0] * len(prompt) + [1] * len(response)
                if self.max_length is not None:
                    seq, mask = seq[: self.max_length], mask[: self.max_length]
                if not any(mask):
                    raise ValueError(
                        f"fastpref: example {index} of the batch has a response with no token left "
                        f"(prompt {len(prompt)} tokens, response {len(response)}, max_length={self.max_length}); "
                        "drop such examples (prepare_listwise_dataset(..., max_length=...)) or raise max_length"
                    )
                ids.append(seq)
                completion.append(mask)
        multiple = self.pad_to_multiple_of
        batch = {
            "input_ids": _pad(ids, self.pad_token_id, multiple),
            "attention_mask": _pad([[1] * len(s) for s in ids], 0, multiple),
            "completion_mask": _pad(completion, 0, multiple),
            "group_sizes": torch.tensor(sizes, dtype=torch.long),
        }
        for key in ("scores", "ref_logps"):
            holders = [i for i, example in enumerate(examples) if example.get(key) is not None]
            if not holders:
                continue
            if len(holders) < len(examples):
                missing = sorted(set(range(len(examples))) - set(holders))
                raise ValueError(f"fastpref: `{key}` is given for some examples of the batch but not for examples "
                                 f"{missing}: give it for every example or for none")
            for index, (example, size) in enumerate(zip(examples, sizes)):
                if len(example[key]) != size:
                    raise ValueError(f"fastpref: `{key}` of example {index} of the batch has {len(example[key])} "
                                     f"values for its {size} responses: one per response, in their order")
            batch[key] = torch.tensor([float(v) for example in examples for v in example[key]])
        return batch


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_listwise(example: dict, tokenizer, eos_token: str | None = None) -> dict:
    """``prompt`` + ``completions`` (K strings) -> ``prompt_ids`` + ``completion_ids`` (K id lists).

    Like TRL's pair tokenisation: each text with the tokenizer's own special tokens (a BOS where it adds
    one), each response tokenised together with the prompt and starting where the two tokenisations
    diverge; ``eos_token`` is appended to responses that lack it.
    """
    prompt = tokenizer(text=example["prompt"])["input_ids"]
    full = []
    for text in example["completions"]:
        if eos_token and not text.endswith(eos_token):
            text = text + eos_token
        full.append(tokenizer(text=example["prompt"] + text)["input_ids"])
    start = min([len(prompt)] + [_common_prefix(prompt, ids) for ids in full])
    return {"prompt_ids": prompt[:start], "completion_ids": [ids[start:] for ids in full]}


def prepare_listwise_dataset(dataset, processing_class, dataset_name: str = "train", max_length: int | None = None,
                             num_proc: int | None = None):
    """Tokenise a list dataset (``prompt``, ``completions``[, ``scores``]) unless it already holds ids.

    With ``max_length``, examples whose prompt alone fills it are dropped (with a warning giving the
    count), as TRL does for pairs: truncation would leave their responses without a token.
    ``num_proc``: processes of the ``map`` / ``filter`` (``DPOConfig.dataset_num_proc``).
    """
    if "completion_ids" not in dataset.column_names:
        if "completions" not in dataset.column_names or "prompt" not in dataset.column_names:
            raise ValueError(
                f"fastpref: the {dataset_name} dataset of a list loss needs columns 'prompt' and 'completions' "
                "(K responses per prompt, optional 'scores'), or 'prompt_ids' and 'completion_ids'"
            )
        if isinstance(dataset[0]["prompt"], list):
            raise NotImplementedError("fastpref: conversational list datasets: apply the chat template to text first")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        dataset = dataset.map(tokenize_listwise, fn_kwargs={"tokenizer": tokenizer, "eos_token": tokenizer.eos_token},
                              num_proc=num_proc, desc=f"fastpref: tokenizing the {dataset_name} list dataset")
    if max_length is not None:
        before = len(dataset)
        dataset = dataset.filter(lambda example: len(example["prompt_ids"]) < max_length, num_proc=num_proc,
                                 desc=f"fastpref: dropping fully truncated examples from the {dataset_name} dataset")
        if len(dataset) < before:
            warnings.warn(f"fastpref: dropped {before - len(dataset)} of {before} examples of the {dataset_name} "
                          f"dataset whose prompt alone fills max_length={max_length}", stacklevel=2)
    return dataset


# What a padded preference batch holds besides per-example columns; a packed batch replaces these.
_PADDED_KEYS = ("input_ids", "attention_mask", "completion_mask")


class PackedCollator:
    """A padded preference collator's batches laid out padding-free and / or with a shared prompt.

    Wraps a collator of pairs (rows ``[chosen; rejected]``: TRL's ``DataCollatorForPreference``, an
    older left-padding one) or of lists (with ``group_sizes``: :class:`ListwiseCollator`): the rows it
    builds, truncated as it truncates them, are read back (:func:`packing.units_from_padded`) and laid
    out by :func:`packing.pack` (``padding_free`` packs units into rows of at most ``max_tokens``
    positions; ``share_prompt`` makes one unit per example). The batch holds the packed keys
    (``input_ids``, ``position_ids``, ``example_ids``, ``branch_ids``, ``score_index``,
    ``score_labels``), every other key of the wrapped batch (reference columns, ``group_sizes``,
    ``scores``) and ``num_tokens``: the real tokens of the padded batch, TRL's count.
    """

    def __init__(self, collator, *, padding_free: bool, share_prompt: bool, max_tokens: int | None = None,
                 pad_to_multiple_of: int | None = None):
        self.collator = collator
        self.padding_free, self.share_prompt = padding_free, share_prompt
        self.max_tokens, self.pad_to_multiple_of = max_tokens, pad_to_multiple_of

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        missing = [k for k in _PADDED_KEYS if k not in batch]
        if missing:
            raise ValueError(f"fastpref: `padding_free` / `share_prompt` read the wrapped collator's padded rows, but "
                             f"its batch lacks {missing} (keys: {sorted(batch)})")
        sizes = batch["group_sizes"].tolist() if "group_sizes" in batch else None
        units = packing.units_from_padded(batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                          share_prompt=self.share_prompt, group_sizes=sizes)
        # row-end padding attends only to itself: any token id serves
        pad = getattr(self.collator, "pad_token_id", None) or 0
        packed = packing.pack(units, pad_token_id=pad, padding_free=self.padding_free,
                              max_tokens=self.max_tokens, pad_to_multiple_of=self.pad_to_multiple_of)
        rest = {k: v for k, v in batch.items() if k not in _PADDED_KEYS}
        clash = sorted(set(rest) & set(packed))
        if clash:
            raise ValueError(f"fastpref: `padding_free` / `share_prompt`: the wrapped collator's batch already has "
                             f"{clash}, which the packed layout sets")
        return {**rest, **packed, "num_tokens": batch["attention_mask"].sum()}

    def __getattr__(self, name):  # pad_token_id, max_length, ... of the wrapped collator
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)


__all__ = ["ListwiseCollator", "PackedCollator", "WithColumns", "prepare_listwise_dataset", "tokenize_listwise"]
