"""FastPrefDPOTrainer with padding_free / share_prompt against TRL's own DPOTrainer (padded), step by step.

Three training steps of a tiny fp32 Llama on the same data: the packed layouts must log TRL's loss and
metrics and end at TRL's weights, with a reference model, with precomputed reference log-probs (the
precompute itself runs in the packed layout) and gradient accumulation, and with LoRA.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from integration_helpers import make_lists, make_model, make_pairs, make_tokenizer  # noqa: E402
from trainer_helpers import lora, train, trl_config  # noqa: E402

from fastpref.integrations import trl as fp_trl  # noqa: E402
from fastpref.integrations.collators import PackedCollator  # noqa: E402

VOCAB = 512
STEPS = 3
LAYOUTS = {
    "padding_free": {"padding_free": True},
    "share_prompt": {"share_prompt": True},
    "both": {"padding_free": True, "share_prompt": True},
}
SETUPS = {
    "ref_model": (False, {}),
    "precomputed+grad_accum": (True, {"gradient_accumulation_steps": 2}),
    "lora": (False, {"peft_config": "lora"}),
}
TOL = 1e-4
_TRL_RUNS: dict = {}


def _run(trainer_cls, config_cls, precompute, overrides, dataset=None):
    overrides = dict(overrides)
    if overrides.get("peft_config") == "lora":
        pytest.importorskip("peft")
        overrides["peft_config"] = lora()
    overrides.setdefault("max_steps", STEPS)
    return train(trainer_cls, config_cls, precompute=precompute, dataset=dataset, vocab=VOCAB, **overrides)


def _trl(setup: str):
    """TRL's own DPOTrainer on the padded batches (one run per setup, shared by the layouts)."""
    from trl import DPOConfig, DPOTrainer

    if setup not in _TRL_RUNS:
        precompute, overrides = SETUPS[setup]
        _TRL_RUNS[setup] = _run(DPOTrainer, DPOConfig, precompute, overrides)
    return _TRL_RUNS[setup]


def _compare_steps(ours, theirs, keys=None):
    assert len(ours) == len(theirs) == STEPS
    worst = {}
    for step, (a, b) in enumerate(zip(ours, theirs)):
        tied = b["rewards/chosen"] == 0.0 and b["rewards/rejected"] == 0.0  # before the first update
        for key in keys or [k for k in b if k not in ("learning_rate", "epoch")]:
            if key == "rewards/accuracies" and tied:
                continue
            worst[key] = max(worst.get(key, 0.0), abs(a[key] - b[key]))
            assert worst[key] <= TOL, f"step {step} {key}: packed {a[key]} vs padded {b[key]}"
    return worst


def _compare_weights(ours, theirs) -> float:
    a = dict(ours.model.named_parameters())
    worst = 0.0
    for name, p in theirs.model.named_parameters():
        worst = max(worst, (a[name].detach() - p.detach()).abs().max().item())
    assert worst <= TOL, worst
    return worst


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_layouts_match_trl_step_by_step(layout, setup):
    precompute, overrides = SETUPS[setup]
    ours_trainer, ours = _run(fp_trl.FastPrefDPOTrainer, fp_trl.FastPrefDPOConfig, precompute,
                              {**overrides, **LAYOUTS[layout]})
    collator = ours_trainer.data_collator.collator
    assert isinstance(collator, PackedCollator) and collator.share_prompt == LAYOUTS[layout].get("share_prompt", False)
    theirs_trainer, theirs = _trl(setup)
    worst = _compare_steps(ours, theirs)
    worst["weights"] = _compare_weights(ours_trainer, theirs_trainer)
    print(layout, setup, {k: f"{v:.1e}" for k, v in worst.items()})


def test_evaluate_matches_trl():
    """Evaluation runs the packed layout (its own packed collator) with TRL's numbers."""
    from trl import DPOConfig, DPOTrainer

    held_out = make_pairs(4, VOCAB, seed=9)
    ours, _ = train(fp_trl.FastPrefDPOTrainer, fp_trl.FastPrefDPOConfig, precompute=False, vocab=VOCAB, max_steps=1,
                    eval_dataset=held_out, **LAYOUTS["both"])
    theirs, _ = train(DPOTrainer, DPOConfig, precompute=False, vocab=VOCAB, max_steps=1, eval_dataset=held_out)
    evaluated, expected = ours.evaluate(), theirs.evaluate()
    for key, value in expected.items():
        if key.startswith("eval_") and not key.endswith(("_runtime", "_per_second")):
            assert abs(evaluated[key] - value) <= TOL, f"{key}: packed {evaluated[key]} vs TRL {value}"


@pytest.mark.parametrize("layout", ["padding_free", "both"])
def test_list_loss_layouts_match_padded(layout):
    """K = 4 responses per prompt (LiPO-lambda, precomputed reference): packed against the padded trainer."""
    dataset = make_lists(8, 4, VOCAB, seed=1)
    settings = dict(fastpref_loss="lipo_lambda")
    padded_trainer, padded = _run(fp_trl.FastPrefDPOTrainer, fp_trl.FastPrefDPOConfig, True, settings, dataset)
    ours_trainer, ours = _run(fp_trl.FastPrefDPOTrainer, fp_trl.FastPrefDPOConfig, True,
                              {**settings, **LAYOUTS[layout]}, dataset)
    assert isinstance(ours_trainer.data_collator.collator, PackedCollator)
    # the precompute ran in the packed layout too: the same K reference log-probs per prompt
    packed_ref, padded_ref = (torch.tensor(t.train_dataset["ref_logps"]) for t in (ours_trainer, padded_trainer))
    assert (packed_ref - padded_ref).abs().max() <= 1e-4
    _compare_steps(ours, padded)
    _compare_weights(ours_trainer, padded_trainer)


def test_packed_batches_run_fewer_backbone_positions():
    """The trainer's own collator: a shared-prompt packed batch holds every real token once, prompts once."""
    args = trl_config(fp_trl.FastPrefDPOConfig, padding_free=True, share_prompt=True)
    trainer = fp_trl.FastPrefDPOTrainer(make_model(VOCAB), ref_model=make_model(VOCAB), args=args,
                                        train_dataset=make_pairs(8, VOCAB), processing_class=make_tokenizer(VOCAB))
    examples = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(examples)
    real = sum(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
    assert int((batch["example_ids"] >= 0).sum()) == real
    assert int(batch["num_tokens"]) == real + sum(len(e["prompt_ids"]) for e in examples)  # TRL's count
    assert batch["score_labels"].shape[0] == 8


@pytest.mark.parametrize("overrides, field", [
    ({"packing_max_tokens": 64}, "packing_max_tokens"),  # without padding_free
    ({"padding_free": True, "packing_max_tokens": 0}, "packing_max_tokens"),
    ({"share_prompt": True, "max_length": 32, "truncation_mode": "keep_end"}, "share_prompt"),
])
def test_layout_settings_are_checked(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        trl_config(fp_trl.FastPrefDPOConfig, **overrides)


@pytest.mark.parametrize("setting", ["padding_free", "share_prompt"])
def test_attention_that_cannot_take_the_mask_is_refused(setting):
    model = make_model(VOCAB)
    model.config._attn_implementation = "flex_attention"
    args = trl_config(fp_trl.FastPrefDPOConfig, **{setting: True})
    with pytest.raises(ValueError, match=f"`{setting}`.*flex_attention"):
        fp_trl.FastPrefDPOTrainer(model, ref_model=make_model(VOCAB), args=args, train_dataset=make_pairs(4, VOCAB),
                                  processing_class=make_tokenizer(VOCAB))


def test_rows_over_the_budget_are_refused():
    args = trl_config(fp_trl.FastPrefDPOConfig, padding_free=True, packing_max_tokens=4, max_steps=1)
    trainer = fp_trl.FastPrefDPOTrainer(make_model(VOCAB), ref_model=make_model(VOCAB), args=args,
                                        train_dataset=make_pairs(4, VOCAB), processing_class=make_tokenizer(VOCAB))
    with pytest.raises(ValueError, match="`packing_max_tokens`"):
        trainer.train()


def test_eager_attention_matches_sdpa():
    """The additive mask form (eager) and the bool form (sdpa) train alike."""
    runs = []
    for impl in ("sdpa", "eager"):
        model = make_model(VOCAB)
        model.set_attn_implementation(impl)
        args = trl_config(fp_trl.FastPrefDPOConfig, padding_free=True, share_prompt=True, max_steps=2,
                          precompute_ref_log_probs=True)
        trainer = fp_trl.FastPrefDPOTrainer(model, args=args, train_dataset=make_pairs(8, VOCAB),
                                            processing_class=make_tokenizer(VOCAB))
        trainer.train()
        runs.append([h["loss"] for h in trainer.state.log_history if "loss" in h and "train_loss" not in h])
    assert runs[0] == pytest.approx(runs[1], abs=1e-5)
    assert torch.isfinite(torch.tensor(runs)).all()


def test_bf16_autocast_matches_trl():
    """bf16=True (accelerate's autocast) with both layouts: the packed mask keeps TRL's bf16 numbers."""
    ours_trainer, ours = _run(fp_trl.FastPrefDPOTrainer, fp_trl.FastPrefDPOConfig, False,
                              {"bf16": True, "max_steps": 2, **LAYOUTS["both"]})
    assert isinstance(ours_trainer.data_collator.collator, PackedCollator)
    from trl import DPOConfig, DPOTrainer

    _, theirs = _run(DPOTrainer, DPOConfig, False, {"bf16": True, "max_steps": 2})
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert abs(a[key] - b[key]) <= 2e-3 * (1 + abs(b[key])), f"step {step} {key}: {a[key]} vs {b[key]}"
