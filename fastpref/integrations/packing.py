"""Padding-free and shared-prompt batch layouts: fewer positions through the backbone, the same numbers.

A padded preference batch runs ``[2B, T]`` positions through the backbone: every prompt twice (once
before the chosen, once before the rejected response) and every padding position in full. Here the
batch is laid out as *units* packed into rows up to a token budget, with no padding but at row ends:

* padding-free (``share_prompt=False``): one unit per sequence, ``prompt · response``;
* shared prompt (``share_prompt=True``): one unit per example, ``prompt · response_1 · ... · response_K``
  (pairs: ``prompt · chosen · rejected``), the prompt computed once.

Isolation is made explicit with a 4-D attention mask, never left to position ids (which alone do not
separate packed sequences under ``sdpa`` or ``eager``): a position attends to an earlier position of
the same unit when that position is in the prompt or in its own response. Position ids restart at
every unit, and every response's continue from its prompt's end, so each response sees exactly what
it sees in its own padded row (RoPE depends on positions only through their differences).

The loss reads a *score view* of the backbone's output instead of a shifted label tensor: token ``j``
of a response is predicted by the hidden state of the position before it in its sequence, which for
``j = 0`` is the prompt's last position — shared by all responses of a unit, so it is gathered once
per response (an index, no extra backbone position). The view is itself a padded batch, one row per
sequence in the padded batch's order (pairs ``[chosen_1..chosen_B; rejected_1..rejected_B]``, lists
prompt by prompt, response by response) holding only the scored positions: ``score_index [S, L]``
(flat positions of the ``[R, T]`` output) and ``score_labels [S, L]`` (``-100`` past a sequence's
end). Every consumer of padded hidden states and labels (:func:`fastpref.preference_loss`, the
trainers' reference precompute and metrics) takes it unchanged.

Plain torch; :func:`check_attention` reads a Hugging Face config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .. import _checks

# Attention implementations that take a custom 4-D mask, and the mask form each needs: ``sdpa`` reads a
# bool mask (True = attend); ``eager`` ADDS the mask to the scores, so a bool mask would be silently wrong.
MASKED_ATTENTION = {"sdpa": "bool", "eager": "additive"}
# The keys of a packed batch (:func:`pack`).
PACKED_KEYS = ("input_ids", "position_ids", "example_ids", "branch_ids", "score_index", "score_labels")


@dataclass(frozen=True)
class Unit:
    """One packed unit: a prompt and the responses that attend to it, with their sequence indices."""

    prompt: list[int]
    responses: list[list[int]]
    seq_ids: list[int]

    def __len__(self) -> int:
        return len(self.prompt) + sum(len(r) for r in self.responses)


def make_units(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[Sequence[int]]],
               seq_ids: Sequence[Sequence[int]], *, share_prompt: bool) -> list[Unit]:
    """Units of examples ``(prompts[e], responses[e])`` whose responses are sequences ``seq_ids[e]``.

    ``share_prompt`` puts each example in one unit; otherwise each response gets a unit of its own
    (with its own copy of the prompt). A response without a scored token is an error (as in the
    padded layout, the first token of a sequence is never scored: nothing precedes it).
    """
    units = []
    for prompt, group, ids in zip(prompts, responses, seq_ids, strict=True):
        prompt, group = list(prompt), [list(r) for r in group]
        for response, sid in zip(group, ids, strict=True):
            if len(response) == 0 or (len(prompt) == 0 and len(response) == 1):
                _checks.fail("completion_mask", f"sequence {sid} has no scored token (prompt {len(prompt)}, "
                                                f"response {len(response)} tokens)")
        if share_prompt:
            units.append(Unit(prompt, group, list(ids)))
        else:
            units.extend(Unit(prompt, [r], [sid]) for r, sid in zip(group, ids))
    return units


def pair_units(prompts, chosen, rejected, *, share_prompt: bool) -> list[Unit]:
    """Units of B pairs; chosen ``b`` is sequence ``b`` and rejected ``b`` is ``B + b`` (the padded rows)."""
    n = len(prompts)
    return make_units(prompts, [[c, r] for c, r in zip(chosen, rejected, strict=True)],
                      [[b, n + b] for b in range(n)], share_prompt=share_prompt)


def list_units(prompts, completions, *, share_prompt: bool) -> list[Unit]:
    """Units of prompts with K responses each (K may vary); prompt ``b``'s ``k``-th response is ``offset_b + k``."""
    ids, start = [], 0
    for group in completions:
        ids.append(list(range(start, start + len(group))))
        start += len(group)
    return make_units(prompts, completions, ids, share_prompt=share_prompt)


def assign_rows(lengths: Sequence[int], max_tokens: int | None) -> list[list[int]]:
    """Unit indices per row: first fit, longest first, each row at most ``max_tokens`` positions.

    ``None`` packs up to the longest unit's length: a row is then never longer than the longest
    sequence of the padded layout would be, so a dense attention mask costs no more per position.
    A unit longer than ``max_tokens`` is refused: it cannot be split without losing its context.
    """
    budget = max(lengths) if max_tokens is None else max_tokens
    if not isinstance(budget, int) or budget < 1:
        _checks.fail("packing_max_tokens", f"must be a positive int or None, got {max_tokens!r}")
    if max(lengths) > budget:
        _checks.fail("packing_max_tokens", f"is {budget} but a unit of the batch needs {max(lengths)} positions "
                                           "(prompt + its responses); raise it, or truncate with `max_length`")
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return rows


def pack(units: Sequence[Unit], *, pad_token_id: int, padding_free: bool = True, max_tokens: int | None = None,
         pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Lays units out in rows: the backbone inputs, the mask description and the score view.

    ``padding_free`` packs several units per row (:func:`assign_rows`, up to ``max_tokens``); without
    it each unit has a row of its own, padded to the longest (a shared prompt alone).

    Returns ``input_ids``, ``position_ids``, ``example_ids`` (unit per position, -1 at row-end padding)
    and ``branch_ids`` (0 on a prompt, k on its k-th response) ``[R, T]``; ``score_index`` and
    ``score_labels`` ``[S, L]`` (the score view, see the module docstring).
    :func:`attention_mask` turns ``example_ids`` / ``branch_ids`` into the model's 4-D mask.
    """
    if not units:
        _checks.fail("units", "is empty: nothing to pack")
    if max_tokens is not None and not padding_free:
        _checks.fail("max_tokens", "is the row budget of padding_free=True, which is off (one unit per row)")
    if padding_free:
        rows = assign_rows([len(u) for u in units], max_tokens)
    else:
        rows = [[i] for i in range(len(units))]
    width = max(sum(len(units[i]) for i in row) for row in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    example_ids = torch.full(shape, -1, dtype=torch.long)
    branch_ids = torch.ones(shape, dtype=torch.long)  # row-end padding: one causal block of its own
    scored = {}  # sequence id -> (flat predictor positions, target tokens)
    for r, row in enumerate(rows):
        at = 0
        for slot, i in enumerate(row):
            unit = units[i]
            p = len(unit.prompt)
            spans = [(at, at + p, unit.prompt, 0, 0)]  # (start, end, tokens, branch, first position id)
            start = at + p
            for k, response in enumerate(unit.responses, start=1):
                spans.append((start, start + len(response), response, k, p))
                # token j of the response is predicted by the position before it: the prompt's last for j = 0
                predictors = ([at + p - 1] if p else []) + list(range(start, start + len(response) - 1))
                scored[unit.seq_ids[k - 1]] = ([r * width + q for q in predictors], response if p else response[1:])
                start += len(response)
            for lo, hi, tokens, branch, first in spans:
                input_ids[r, lo:hi] = torch.tensor(tokens, dtype=torch.long)
                position_ids[r, lo:hi] = torch.arange(first, first + hi - lo)
                example_ids[r, lo:hi] = slot
                branch_ids[r, lo:hi] = branch
            at = start
        position_ids[r, at:] = torch.arange(width - at)
    responses = sum(len(u.responses) for u in units)
    if len(scored) != responses or sorted(scored) != list(range(responses)):
        _checks.fail("units", f"must number their {responses} sequences 0..S-1 once each, got "
                              f"{sorted(u for unit in units for u in unit.seq_ids)[:8]}...")
    length = max(len(labels) for _, labels in scored.values())
    score_index = torch.zeros(len(scored), length, dtype=torch.long)
    score_labels = torch.full((len(scored), length), -100, dtype=torch.long)
    for sid, (index, labels) in scored.items():
        score_index[sid, : len(index)] = torch.tensor(index, dtype=torch.long)
        score_labels[sid, : len(labels)] = torch.tensor(labels, dtype=torch.long)
    return {
        "input_ids": input_ids, "position_ids": position_ids, "example_ids": example_ids, "branch_ids": branch_ids,
        "score_index": score_index, "score_labels": score_labels,
    }


def pack_pairs(prompts, chosen, rejected, *, pad_token_id: int, share_prompt: bool, padding_free: bool = True,
               max_tokens: int | None = None, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """:func:`pack` of :func:`pair_units` (token id lists per pair)."""
    return pack(pair_units(prompts, chosen, rejected, share_prompt=share_prompt), pad_token_id=pad_token_id,
                padding_free=padding_free, max_tokens=max_tokens, pad_to_multiple_of=pad_to_multiple_of)


def pack_lists(prompts, completions, *, pad_token_id: int, share_prompt: bool, padding_free: bool = True,
               max_tokens: int | None = None, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """:func:`pack` of :func:`list_units`, plus ``group_sizes [B]`` for the ``"groups"`` loss layout."""
    batch = pack(list_units(prompts, completions, share_prompt=share_prompt), pad_token_id=pad_token_id,
                 padding_free=padding_free, max_tokens=max_tokens, pad_to_multiple_of=pad_to_multiple_of)
    batch["group_sizes"] = torch.tensor([len(group) for group in completions], dtype=torch.long)
    return batch


def sequences_from_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          completion_mask: torch.Tensor) -> list[tuple[list[int], list[int]]]:
    """``(prompt, response)`` token lists of the rows of a padded batch, padded on either side.

    Reads TRL's collators (right padding, ``completion_mask``) and older ones (left-padded prompts,
    right-padded completions): the real tokens (``attention_mask == 1``) of a row, in order, are its
    prompt followed by its completion (``completion_mask == 1``).
    """
    out = []
    for r, (ids, real, completion) in enumerate(zip(input_ids.tolist(), attention_mask.tolist(),
                                                    completion_mask.tolist())):
        tokens = [(t, c) for t, a, c in zip(ids, real, completion) if a]
        flags = [c for _, c in tokens]
        first = flags.index(1) if 1 in flags else len(flags)
        if any(c == 0 for c in flags[first:]):
            _checks.fail("completion_mask", f"row {r} has prompt tokens after its completion starts")
        out.append(([t for t, _ in tokens[:first]], [t for t, _ in tokens[first:]]))
    return out


def units_from_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor, *,
                      share_prompt: bool, group_sizes: Sequence[int] | None = None) -> list[Unit]:
    """The units of a padded batch, as its collator truncated it: pairs ``[chosen; rejected]`` or,
    with ``group_sizes``, lists (each prompt's responses in consecutive rows).

    With ``share_prompt`` the rows of an example must hold the same prompt (``truncation_mode="keep_end"``
    cuts each row's prompt differently).
    """
    rows = sequences_from_padded(input_ids, attention_mask, completion_mask)
    if not share_prompt:  # every row its own unit; sequence i is row i in both layouts
        return make_units([p for p, _ in rows], [[r] for _, r in rows], [[i] for i in range(len(rows))],
                          share_prompt=False)
    if group_sizes is None:
        if len(rows) % 2:
            _checks.fail("input_ids", f"has {len(rows)} rows; a pair batch has [chosen; rejected] rows")
        half = len(rows) // 2
        members = [[b, half + b] for b in range(half)]
    else:
        if sum(group_sizes) != len(rows):
            _checks.fail("group_sizes", f"sums to {sum(group_sizes)} but the batch has {len(rows)} rows")
        starts = [sum(group_sizes[:g]) for g in range(len(group_sizes))]
        members = [list(range(s, s + k)) for s, k in zip(starts, group_sizes)]
    for e, ids in enumerate(members):
        if any(rows[i][0] != rows[ids[0]][0] for i in ids):
            _checks.fail("share_prompt", f"needs one prompt per example, but the rows of example {e} hold different "
                                         "prompts (truncation_mode='keep_end' cuts each row's prompt differently: use "
                                         "'keep_start')")
    return make_units([rows[ids[0]][0] for ids in members], [[rows[i][1] for i in ids] for ids in members],
                      members, share_prompt=True)


def attention_mask(example_ids: torch.Tensor, branch_ids: torch.Tensor, *, implementation: str = "sdpa",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``[R, 1, T, T]`` mask of a packed batch in the form ``implementation`` takes.

    Position ``q`` attends to ``k <= q`` of the same unit when ``k`` is on the prompt or on ``q``'s own
    response. ``sdpa``: bool (True = attend); ``eager``: additive (0 / ``finfo(dtype).min``), as
    Hugging Face's own masks for those implementations.
    """
    form = MASKED_ATTENTION.get(implementation)
    if form is None:
        _checks.fail("attn_implementation", f"{implementation!r} cannot take a packed batch's 4-D mask; "
                                            f"use one of {sorted(MASKED_ATTENTION)}")
    t = example_ids.shape[-1]
    pos = torch.arange(t, device=example_ids.device)
    causal = pos[None, :] <= pos[:, None]
    same_unit = example_ids[:, :, None] == example_ids[:, None, :]
    q_branch, k_branch = branch_ids[:, :, None], branch_ids[:, None, :]
    allowed = (causal & same_unit & ((k_branch == 0) | (k_branch == q_branch)))[:, None]
    if form == "bool":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def check_attention(config, setting: str) -> str:
    """The model's attention implementation, if a packed batch's 4-D mask reaches it intact; else ``ValueError``.

    ``setting`` names the option that asked for packing (``padding_free`` / ``share_prompt``). Flash
    attention's varlen path cannot express a shared prompt and flex attention takes a block mask, not a
    tensor: both are refused, as are sliding-window layers (one 4-D mask would replace their window).
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    # unset (a config no model has resolved yet): the additive form, which sdpa reads correctly too
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in MASKED_ATTENTION:
        _checks.fail(setting, f"needs an attention implementation that takes a custom 4-D mask "
                              f"({' or '.join(sorted(MASKED_ATTENTION))}); the model runs {implementation!r}. Load it "
                              "with attn_implementation='sdpa', or turn the option off")
    layer_types = getattr(config, "layer_types", None) or []
    windowed = any(kind != "full_attention" for kind in layer_types)
    if windowed or getattr(config, "sliding_window", None) is not None:
        _checks.fail(setting, "is not supported for models with sliding-window attention layers: the packed "
                              "batch's 4-D mask would replace their window")
    return implementation


def model_inputs(batch: dict, config, dtype: torch.dtype, setting: str = "padding_free") -> dict[str, torch.Tensor]:
    """Backbone keyword arguments of a packed batch: ``input_ids``, ``position_ids``, the 4-D ``attention_mask``."""
    implementation = check_attention(config, setting)
    return {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "attention_mask": attention_mask(batch["example_ids"], batch["branch_ids"], implementation=implementation,
                                         dtype=dtype),
    }


def score_view(hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden [S, L, d], labels [S, L])``: the scored positions of a packed output, one row per sequence.

    ``hidden`` is the backbone's ``[R, T, d]`` output (or a reference model's). The result is a padded
    batch with the labels already aligned (no shift), for :func:`fastpref.preference_loss` as it is. The
    gather is differentiable (a position that predicts the first token of several responses gets all
    their gradients).
    """
    if hidden.shape[:2] != batch["input_ids"].shape:
        _checks.fail("padding_free", f"(packed batch) got hidden states {tuple(hidden.shape[:2])} for inputs "
                                     f"{tuple(batch['input_ids'].shape)}: models that add positions (prompt-learning "
                                     "PEFT) cannot run packed batches")
    index = batch["score_index"].to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    view = flat.index_select(0, index.reshape(-1)).view(*index.shape, hidden.shape[-1])
    return view, batch["score_labels"].to(hidden.device)


def backbone_positions(batch: dict) -> int:
    """Positions the backbone runs for a batch (padded or packed): rows x width, padding included."""
    return batch["input_ids"].numel()


__all__ = [
    "MASKED_ATTENTION", "PACKED_KEYS", "Unit", "assign_rows", "attention_mask", "backbone_positions", "check_attention",
    "list_units", "make_units", "model_inputs", "pack", "pack_lists", "pack_pairs", "pair_units", "score_view",
    "sequences_from_padded", "units_from_padded",
]
