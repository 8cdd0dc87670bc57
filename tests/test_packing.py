"""Padding-free and shared-prompt layouts (fastpref.integrations.packing) against the padded batch.

Every layout runs the same tiny fp32 Llama backbone and ``fastpref.preference_loss`` on its hidden
states and ``lm_head.weight``; the padded batch is built here by hand, one sequence per row, as TRL's
collators build it. Loss, every metric and every parameter gradient must agree within 1e-5 relative.
"""

from __future__ import annotations

import random

import pytest
import torch

from integration_helpers import make_model

import fastpref
from fastpref.integrations import packing

VOCAB = 512
PAD = 0
TOL = 1e-5
# name: (share_prompt, padding_free, max_tokens)
LAYOUTS = {
    "padding_free": (False, True, None),
    "padding_free_one_row": (False, True, 10**6),
    "share_prompt": (True, False, None),
    "share_prompt_packed": (True, True, 10**6),
}
LOSSES = {  # kind, loss, hyperparameters
    "dpo": ("pairs", "dpo", {"beta": 0.1}),
    "mallows_dpo": ("pairs", "mallows_dpo", {"beta": 10.0, "reference_free": False}),
    "lipo_lambda": ("lists", "lipo_lambda", {}),
}


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def _examples(kind: str, num: int = 4, seed: int = 0, k: int = 4):
    """``(prompts, responses)``: varied lengths, including a one-token prompt and a one-token response."""
    rng = random.Random(seed)
    size = 2 if kind == "pairs" else k
    prompts = [_tokens(rng, n) for n in [1] + [rng.randint(2, 9) for _ in range(num - 1)]]
    responses = [[_tokens(rng, rng.randint(1, 8)) for _ in range(size)] for _ in range(num)]
    responses[-1][0] = _tokens(rng, 1)
    return prompts, responses


def _sequences(kind, prompts, responses) -> list[tuple[list[int], list[int]]]:
    """The padded batch's rows in order: pairs ``[chosen; rejected]``, lists prompt by prompt."""
    if kind == "pairs":
        return [(p, r[0]) for p, r in zip(prompts, responses)] + [(p, r[1]) for p, r in zip(prompts, responses)]
    return [(p, c) for p, group in zip(prompts, responses) for c in group]


def _padded(rows, left: bool = False) -> dict[str, torch.Tensor]:
    """One row per sequence; right padding (TRL), or ``left``: prompts left-padded, completions right-padded."""
    if left:
        wp, wc = max(len(p) for p, _ in rows), max(len(c) for _, c in rows)
        ids = [[PAD] * (wp - len(p)) + p + c + [PAD] * (wc - len(c)) for p, c in rows]
        real = [[0] * (wp - len(p)) + [1] * (len(p) + len(c)) + [0] * (wc - len(c)) for p, c in rows]
        comp = [[0] * wp + [1] * len(c) + [0] * (wc - len(c)) for p, c in rows]
    else:
        width = max(len(p) + len(c) for p, c in rows)
        ids = [p + c + [PAD] * (width - len(p) - len(c)) for p, c in rows]
        real = [[1] * (len(p) + len(c)) + [0] * (width - len(p) - len(c)) for p, c in rows]
        comp = [[0] * len(p) + [1] * len(c) + [0] * (width - len(p) - len(c)) for p, c in rows]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(real), "completion_mask": torch.tensor(comp)}


def _padded_view(model, batch):
    """``(hidden, labels)`` of a padded batch: position t predicts token t + 1 of its row."""
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = fastpref.shift_labels(batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100))
    return hidden, labels


def _packed_view(model, batch):
    """``(hidden, labels)`` of a packed batch: its score view, one row of scored positions per sequence."""
    inputs = packing.model_inputs(batch, model.config, torch.float32)
    return packing.score_view(model.model(**inputs).last_hidden_state, batch)


def _pack(kind, prompts, responses, layout: str):
    share, padding_free, max_tokens = LAYOUTS[layout]
    kwargs = dict(pad_token_id=PAD, share_prompt=share, padding_free=padding_free, max_tokens=max_tokens)
    if kind == "pairs":
        return packing.pack_pairs(prompts, [r[0] for r in responses], [r[1] for r in responses], **kwargs)
    return packing.pack_lists(prompts, responses, **kwargs)


def _views(kind, prompts, responses, layout):
    """``view(model) -> (hidden, labels)`` for ``layout`` ("padded", "left_padded" or packed)."""
    if layout in ("padded", "left_padded"):
        batch = _padded(_sequences(kind, prompts, responses), left=layout == "left_padded")
        return lambda model: _padded_view(model, batch)
    batch = _pack(kind, prompts, responses, layout)
    return lambda model: _packed_view(model, batch)


def _loss_inputs(kind, prompts, responses, seed: int = 0) -> dict:
    rows = len(_sequences(kind, prompts, responses))
    if kind == "pairs":
        return {}
    scores = torch.rand(rows, generator=torch.Generator().manual_seed(seed)) * 10
    return {"group_sizes": [len(g) for g in responses], "scores": scores}


def _reference(kind, ref, view, mode: str, entropy: bool) -> dict:
    """The reference as ``preference_loss`` takes it: precomputed per-sequence values, or its head online."""
    with torch.no_grad():
        hidden, labels = view(ref)
    if mode == "online":
        return {"ref_hidden": hidden, "ref_weight": ref.lm_head.weight}
    seq = fastpref.sequence_logps(hidden, ref.lm_head.weight, labels, entropy=entropy)
    if kind == "lists":
        return {"ref_logps": seq.sum_logp}
    out = dict(zip(("ref_chosen_logps", "ref_rejected_logps"), seq.sum_logp.chunk(2)))
    if entropy:
        out.update(zip(("ref_chosen_entropy", "ref_rejected_entropy"), seq.sum_entropy.chunk(2)))
    return out


def _step(model, ref, micro_batches, loss: str, mode: str):
    """Loss, metrics and parameter gradients of one optimizer step over ``micro_batches`` (accumulated)."""
    kind, name, hparams = LOSSES[loss]
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.zeros_like(p) for p in params]
    total, metrics = 0.0, []
    for view, extra in micro_batches:
        hidden, labels = view(model)
        ref_inputs = _reference(kind, ref, view, mode, entropy=name == "mallows_dpo")
        out = fastpref.preference_loss(hidden, model.lm_head.weight, labels, loss=name, trl_metrics=True,
                                       **extra, **ref_inputs, **hparams)
        scaled = out.loss / len(micro_batches)
        for g, d in zip(grads, torch.autograd.grad(scaled, params)):
            g += d
        total += scaled.item()
        metrics.append(out.metrics)
    return total, metrics, grads


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-6) -> float:
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def _assert_same_step(ours, theirs, tol=TOL):
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = ours, theirs
    assert abs(loss_a - loss_b) <= tol * abs(loss_b), (loss_a, loss_b)
    worst = 0.0
    for ma, mb in zip(metrics_a, metrics_b):
        assert set(ma) == set(mb)
        for key in mb:
            # Relative to the metric, or to what it is computed from when that is larger: a margin is a
            # difference of rewards (as accurate as they are), and values below 1e-3 are compared at 1e-3
            # (the mean logit of a random head is ~5e-7, a cancelling sum of O(1) logits).
            scale = 1e-3
            if key == "rewards/margins":
                scale = abs(mb["rewards/chosen"].item()) + abs(mb["rewards/rejected"].item())
            err = _rel(ma[key].float(), mb[key].float(), floor=scale)
            assert err <= tol, f"{key}: {ma[key].item()} vs {mb[key].item()}"
            worst = max(worst, err)
    grad_err = max(_rel(a, b) for a, b in zip(grads_a, grads_b))
    assert grad_err <= tol
    print(f"loss {abs(loss_a - loss_b) / abs(loss_b):.1e}, metrics {worst:.1e}, gradients {grad_err:.1e}")


def _models(impl: str):
    """Policy and a frozen reference; the reference head is sharpened so that rewards are O(1), not
    differences of near-equal near-uniform log-probs (whose fp32 cancellation no layout controls)."""
    model, ref = make_model(VOCAB, seed=0), make_model(VOCAB, seed=1).requires_grad_(False)
    ref.lm_head.weight.mul_(8.0)
    model.set_attn_implementation(impl)
    ref.set_attn_implementation(impl)
    return model, ref


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["precomputed", "online"])
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_padded(layout, loss, mode, impl):
    kind = LOSSES[loss][0]
    model, ref = _models(impl)
    prompts, responses = _examples(kind)
    extra = _loss_inputs(kind, prompts, responses)
    ours = _step(model, ref, [(_views(kind, prompts, responses, layout), extra)], loss, mode)
    theirs = _step(model, ref, [(_views(kind, prompts, responses, "padded"), extra)], loss, mode)
    _assert_same_step(ours, theirs)


@pytest.mark.parametrize("layout", ["padding_free", "share_prompt_packed"])
def test_token_level_kl_loss_matches_padded(layout):
    """TDPO2's per-token KL aligns the policy and reference positions token by token."""
    model, ref = _models("sdpa")
    prompts, responses = _examples("pairs", seed=5)
    LOSSES["tdpo2"] = ("pairs", "tdpo2", {})
    try:
        ours = _step(model, ref, [(_views("pairs", prompts, responses, layout), {})], "tdpo2", "online")
        theirs = _step(model, ref, [(_views("pairs", prompts, responses, "padded"), {})], "tdpo2", "online")
    finally:
        del LOSSES["tdpo2"]
    _assert_same_step(ours, theirs)


@pytest.mark.parametrize("kind, loss", [("pairs", "dpo"), ("lists", "lipo_lambda")])
@pytest.mark.parametrize("layout", ["padding_free", "share_prompt_packed"])
def test_gradient_accumulation_matches_padded(layout, kind, loss):
    """Two micro-batches, each packed on its own, accumulate the padded step's gradients."""
    model, ref = _models("sdpa")
    prompts, responses = _examples(kind, num=6, seed=2)
    halves = [(prompts[:3], responses[:3]), (prompts[3:], responses[3:])]

    def micro(layout_name):
        return [(_views(kind, p, r, layout_name), _loss_inputs(kind, p, r, seed=i)) for i, (p, r) in enumerate(halves)]

    _assert_same_step(_step(model, ref, micro(layout), loss, "online"),
                      _step(model, ref, micro("padded"), loss, "online"))


@pytest.mark.parametrize("layout", ["padding_free", "share_prompt", "share_prompt_packed"])
def test_one_pair_with_one_token_prompt_and_response(layout):
    model, ref = _models("sdpa")
    prompts, responses = [[7]], [[[9], [11, 12, 13]]]
    ours = _step(model, ref, [(_views("pairs", prompts, responses, layout), {})], "dpo", "online")
    theirs = _step(model, ref, [(_views("pairs", prompts, responses, "padded"), {})], "dpo", "online")
    _assert_same_step(ours, theirs)


def _from_padded(padded: dict, layout: str) -> dict:
    share, padding_free, max_tokens = LAYOUTS[layout]
    units = packing.units_from_padded(padded["input_ids"], padded["attention_mask"], padded["completion_mask"],
                                      share_prompt=share)
    return packing.pack(units, pad_token_id=PAD, padding_free=padding_free, max_tokens=max_tokens)


@pytest.mark.parametrize("layout", ["padding_free", "share_prompt_packed"])
def test_left_padded_batches_convert(layout):
    """Older collators left-pad prompts: the converter reads their rows back, and the step matches theirs."""
    model, ref = _models("sdpa")
    prompts, responses = _examples("pairs", seed=3)
    rows = _sequences("pairs", prompts, responses)
    left = _padded(rows, left=True)
    assert packing.sequences_from_padded(left["input_ids"], left["attention_mask"], left["completion_mask"]) == rows
    batch = _from_padded(left, layout)
    ours = _step(model, ref, [(lambda m: _packed_view(m, batch), {})], "dpo", "online")
    theirs = _step(model, ref, [(lambda m: _padded_view(m, left), {})], "dpo", "online")
    _assert_same_step(ours, theirs)


@pytest.mark.parametrize("mode, layout", [("keep_start", "share_prompt_packed"), ("keep_end", "padding_free")])
def test_trl_collator_batches_convert_with_truncation(mode, layout):
    """TRL's own pair collator (truncating to 9 tokens) read back and packed: the same step as its padded batch."""
    trl = pytest.importorskip("trl.trainer.dpo_trainer")
    prompts, responses = _examples("pairs", seed=4)
    examples = [{"prompt_ids": p, "chosen_ids": r[0], "rejected_ids": r[1]} for p, r in zip(prompts, responses)]
    padded = trl.DataCollatorForPreference(pad_token_id=PAD, max_length=9, truncation_mode=mode)(examples)
    assert padded["input_ids"].shape[1] == 9  # something was cut
    batch = _from_padded(padded, layout)
    model, ref = _models("sdpa")
    ours = _step(model, ref, [(lambda m: _packed_view(m, batch), {})], "dpo", "online")
    theirs = _step(model, ref, [(lambda m: _padded_view(m, padded), {})], "dpo", "online")
    _assert_same_step(ours, theirs)


def test_lists_convert_from_the_listwise_collator():
    from fastpref.integrations.collators import ListwiseCollator

    prompts, responses = _examples("lists", num=3, seed=9)
    padded = ListwiseCollator(pad_token_id=PAD)([{"prompt_ids": p, "completion_ids": r}
                                                 for p, r in zip(prompts, responses)])
    units = packing.units_from_padded(padded["input_ids"], padded["attention_mask"], padded["completion_mask"],
                                      share_prompt=True, group_sizes=padded["group_sizes"].tolist())
    assert units == packing.list_units(prompts, responses, share_prompt=True)


def _leak(model, batch, mask: bool) -> tuple[float, float]:
    """Perturb each response in turn: ``(largest move of any OTHER sequence's hidden states, smallest own move)``.

    ``mask=False`` runs the packed row with restarting position ids only (the negative control).
    """
    inputs = packing.model_inputs(batch, model.config, torch.float32)
    if not mask:
        inputs.pop("attention_mask")
    with torch.no_grad():
        base = model.model(**inputs).last_hidden_state
        leak, own = 0.0, float("inf")
        units = batch["example_ids"] * 64 + batch["branch_ids"]
        for key in units.unique().tolist():
            where = units == key
            if key < 0 or key % 64 == 0:  # padding, prompts
                continue
            ids = inputs["input_ids"].clone()
            ids[where] = (ids[where] + 17) % (VOCAB - 3) + 3
            moved = (model.model(**{**inputs, "input_ids": ids}).last_hidden_state - base).abs().amax(-1)
            leak = max(leak, moved[~where].max().item())
            own = min(own, moved[where].max().item())
    return leak, own


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["padding_free_one_row", "share_prompt_packed"])
def test_no_token_attends_across_sequences(layout, impl):
    model, _ = _models(impl)
    prompts, responses = _examples("lists", num=3, k=3, seed=6)
    batch = _pack("lists", prompts, responses, layout)
    assert batch["input_ids"].shape[0] == 1  # everything in one row
    leak, own = _leak(model, batch, mask=True)
    assert own > 1e-2  # the perturbation reached its own sequence
    assert leak <= 1e-6, f"hidden states of other sequences moved by {leak}"
    control, _ = _leak(model, batch, mask=False)
    assert control > 1e-2  # the check detects attention across sequences when the mask is missing


def test_backbone_positions_shrink():
    prompts, responses = _examples("lists", num=4, k=4, seed=7)
    padded = _padded(_sequences("lists", prompts, responses))
    shared = _pack("lists", prompts, responses, "share_prompt_packed")
    packed = _pack("lists", prompts, responses, "padding_free_one_row")
    real = sum(len(p) + len(c) for p, c in _sequences("lists", prompts, responses))
    assert packing.backbone_positions(packed) == real
    expected_shared = sum(len(p) + sum(map(len, group)) for p, group in zip(prompts, responses))
    assert packing.backbone_positions(shared) == expected_shared < real < packing.backbone_positions(padded)


def test_rows_respect_the_budget_and_long_units_are_refused():
    prompts, responses = _examples("pairs", num=6, seed=8)
    chosen, rejected = [r[0] for r in responses], [r[1] for r in responses]
    lengths = [len(p) + len(c) for p, c in zip(prompts, chosen)] + [len(p) + len(r) for p, r in zip(prompts, rejected)]
    batch = packing.pack_pairs(prompts, chosen, rejected, pad_token_id=PAD, share_prompt=False, max_tokens=20)
    assert batch["input_ids"].shape[1] <= 20
    for row, units in zip(batch["example_ids"], batch["branch_ids"]):
        assert (row >= 0).sum() <= 20
    default = packing.pack_pairs(prompts, chosen, rejected, pad_token_id=PAD, share_prompt=False)
    assert default["input_ids"].shape[1] == max(lengths)
    with pytest.raises(ValueError, match="packing_max_tokens"):
        packing.pack_pairs(prompts, chosen, rejected, pad_token_id=PAD, share_prompt=False, max_tokens=max(lengths) - 1)
    with pytest.raises(ValueError, match="`max_tokens`"):  # one unit per row: a budget would be ignored
        packing.pack_pairs(prompts, chosen, rejected, pad_token_id=PAD, share_prompt=True, padding_free=False,
                           max_tokens=20)


def test_refusals():
    from transformers import LlamaConfig, MistralConfig

    for impl in ("flash_attention_2", "flex_attention"):
        config = LlamaConfig()
        config._attn_implementation = impl
        with pytest.raises(ValueError, match=f"share_prompt.*{impl}"):
            packing.check_attention(config, "share_prompt")
    with pytest.raises(ValueError, match="padding_free.*sliding-window"):
        packing.check_attention(MistralConfig(sliding_window=16), "padding_free")
    config = MistralConfig(sliding_window=None)
    config._attn_implementation = "sdpa"
    assert packing.check_attention(config, "padding_free") == "sdpa"
    cut = _padded([([1, 2], [3, 4]), ([2], [5])])  # keep_end truncation cut the second row's prompt
    with pytest.raises(ValueError, match="share_prompt.*keep_start"):
        packing.units_from_padded(cut["input_ids"], cut["attention_mask"], cut["completion_mask"], share_prompt=True)
    with pytest.raises(ValueError, match="no scored token"):
        packing.pair_units([[]], [[3]], [[4, 5]], share_prompt=False)
    with pytest.raises(ValueError, match="`units` must number"):
        packing.pack([packing.Unit([1], [[2], [3]], [0, 0])], pad_token_id=PAD)
    model, _ = _models("sdpa")
    batch = _pack("pairs", [[5, 6]], [[[7], [8, 9]]], "padding_free")
    with pytest.raises(ValueError, match="padding_free.*prompt-learning"):
        packing.score_view(torch.zeros(1, batch["input_ids"].shape[1] + 4, 8), batch)
    with pytest.raises(ValueError, match="attn_implementation"):
        packing.attention_mask(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long),
                               implementation="flash_attention_2")
