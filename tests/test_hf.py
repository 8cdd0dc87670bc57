"""The plain Hugging Face Trainer with fastpref's mixin and a user's own pair collator: the loss equals
the materialising computation, gradient accumulation is normalised like TRL, metrics are logged."""

from __future__ import annotations

import math
import random
import tempfile

import pytest
import torch

pytest.importorskip("transformers")

from integration_helpers import frozen_copy, make_model  # noqa: E402

import fastpref  # noqa: E402
from fastpref.integrations.hf import FastPrefTrainerMixin, FusedLoss, fastpref_compute_loss  # noqa: E402

VOCAB = 320


def _dataset(n=8, seed=0):
    from datasets import Dataset

    rng = random.Random(seed)
    rows = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for _ in range(n):
        rows["prompt_ids"].append([rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 6))])
        rows["chosen_ids"].append([rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 7))])
        rows["rejected_ids"].append([rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 7))])
    return Dataset.from_dict(rows)


def collate(examples):
    """A user's pair collator: rows [chosen; rejected], HF-style labels (-100 on prompt and padding)."""
    seqs = [e["prompt_ids"] + e["chosen_ids"] for e in examples]
    seqs += [e["prompt_ids"] + e["rejected_ids"] for e in examples]
    prompts = [len(e["prompt_ids"]) for e in examples] * 2
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (seq, p) in enumerate(zip(seqs, prompts)):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, p: len(seq)] = torch.tensor(seq[p:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PrefTrainer(FastPrefTrainerMixin, __import__("transformers").Trainer):
    pass


def _args(**overrides):
    from transformers import TrainingArguments

    settings = dict(output_dir=tempfile.mkdtemp(prefix="fastpref-test-"), max_steps=1, learning_rate=0.05, optim="sgd",
                    per_device_train_batch_size=4,
                    logging_steps=1, save_strategy="no", report_to="none", seed=0, use_cpu=True,
                    remove_unused_columns=False, disable_tqdm=True, lr_scheduler_type="constant")
    settings.update(overrides)
    return TrainingArguments(**settings)


def _materialised_logps(model, batch):
    """Summed completion log-probs from the full logits (the path fastpref replaces)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (logp * (labels != -100)).sum(-1)


def test_compute_loss_helper_matches_materialised_logits():
    model, ref = make_model(VOCAB, seed=1), make_model(VOCAB, seed=2)
    batch = collate([_dataset()[i] for i in range(4)])
    out = fastpref_compute_loss(model, batch, "dpo", ref_model=ref, beta=0.3)
    pc, pr = _materialised_logps(model, batch).chunk(2)
    rc, rr = _materialised_logps(ref, batch).chunk(2)
    want, chosen, _ = fastpref.dpo_loss(pc, pr, rc, rr, beta=0.3)
    assert abs(out.loss.item() - want.item()) < 1e-5
    assert abs(out.metrics["rewards/chosen"].item() - chosen.mean().item()) < 1e-5
    assert abs(out.metrics["logps/chosen"].item() - pc.mean().item()) < 1e-4


def test_gradient_accumulation_is_normalised_like_trl():
    """One SGD step over 4 pairs: batch 4, or 2 micro-batches of 2 with accumulation, give the same weights."""
    weights = []
    for batch, accumulation in ((4, 1), (2, 2)):
        model = make_model(VOCAB, seed=1)
        trainer = PrefTrainer(model=model, args=_args(per_device_train_batch_size=batch,
                                                      gradient_accumulation_steps=accumulation),
                              train_dataset=_dataset(), data_collator=collate, ref_model=frozen_copy(model),
                              fastpref_loss="dpo", fastpref_loss_kwargs={"beta": 0.3})
        trainer.train()
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        assert "rewards/margins" in trainer.state.log_history[0]
    for name, value in weights[0].items():
        assert torch.allclose(value, weights[1][name], atol=1e-6), name


def test_mixin_trains_mallows_with_reference_model():
    model = make_model(VOCAB, seed=1)
    trainer = PrefTrainer(model=model, args=_args(max_steps=2), train_dataset=_dataset(), data_collator=collate,
                          ref_model=frozen_copy(model), fastpref_loss="mallows_dpo",
                          fastpref_loss_kwargs={"beta": 10.0, "reference_free": False})
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    assert len(logs) == 2
    for key in ("loss", "rewards/chosen", "logps/rejected", "neg_log_dispersion", "entropy", "mean_token_accuracy"):
        assert key in logs[0], key


def _mask_collate(examples):
    """The same pairs with a ``completion_mask`` (TRL-style) instead of ``labels``."""
    batch = collate(examples)
    batch["completion_mask"] = (batch.pop("labels") != -100).long()
    return batch


def test_typos_fail_before_any_forward():
    model, batch = make_model(VOCAB, seed=1), collate([_dataset()[i] for i in range(2)])
    with pytest.raises(ValueError, match=r"`bta`.*did you mean 'beta'"):
        fastpref_compute_loss(model, batch, "dpo", ref_model=frozen_copy(model), bta=0.3)
    with pytest.raises(ValueError, match="`chunk_size`"):
        fastpref_compute_loss(model, batch, "dpo", ref_model=frozen_copy(model), chunk_size=0)
    plan = FusedLoss("dpo", {"beta": 0.3})
    with pytest.raises(ValueError, match="`beta` cannot be given with a FusedLoss"):
        fastpref_compute_loss(model, batch, plan, ref_model=frozen_copy(model), beta=0.5)
    with pytest.raises(ValueError, match=r"keys \['soft_label'\]"):
        fastpref_compute_loss(model, {**batch, "soft_label": torch.full((2,), 0.7)}, "mmpo",
                              ref_model=frozen_copy(model))
    for options, match in (({"fastpref_options": {"chunk": 8}}, r"unknown keys \['chunk'\]"),
                           ({"fastpref_loss_kwargs": {"bta": 1.0}}, "`bta`"),
                           ({"fastpref_options": {"backend": "gpu"}}, "`backend`")):
        with pytest.raises(ValueError, match=match):
            PrefTrainer(model=model, args=_args(), train_dataset=_dataset(), data_collator=collate, **options)


def test_loss_hyperparameters_in_the_batch_reach_the_loss():
    """A collator's ``soft_labels`` go to MMPO (they used to go to the model's **kwargs and be dropped)."""
    model, ref = make_model(VOCAB, seed=1), make_model(VOCAB, seed=2)
    batch = collate([_dataset()[i] for i in range(4)])
    soft = torch.tensor([0.9, 0.2, 0.6, 0.5])
    out = fastpref_compute_loss(model, {**batch, "soft_labels": soft}, "mmpo", ref_model=ref, beta=0.3)
    pc, pr = _materialised_logps(model, batch).chunk(2)
    rc, rr = _materialised_logps(ref, batch).chunk(2)
    want, _, _ = fastpref.mmpo_loss(pc, pr, rc, rr, beta=0.3, soft_labels=soft.double())
    assert abs(out.loss.item() - want.item()) < 1e-5


def test_evaluation_runs_the_fused_loss_and_logs_its_metrics():
    """Without a ``labels`` key the Trainer's own prediction step skipped the loss: no eval_loss, no metrics."""
    model = make_model(VOCAB, seed=1)
    ref = frozen_copy(model)
    eval_data = _dataset(4, seed=5)
    trainer = PrefTrainer(model=model, args=_args(per_device_eval_batch_size=4), train_dataset=_dataset(),
                          eval_dataset=eval_data, data_collator=_mask_collate, ref_model=ref, fastpref_loss="dpo",
                          fastpref_loss_kwargs={"beta": 0.3})
    metrics = trainer.evaluate()
    batch = _mask_collate([eval_data[i] for i in range(4)])
    expected = fastpref_compute_loss(model.eval(), batch, "dpo", ref_model=ref, beta=0.3)
    assert abs(metrics["eval_loss"] - expected.loss.item()) < 1e-5
    assert abs(metrics["eval_rewards/margins"] - expected.metrics["rewards/margins"].item()) < 1e-5
    assert "eval_entropy" in metrics and "rewards/margins" not in metrics
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    assert outputs.logits.shape[:2] == batch["input_ids"].shape and abs(loss.item() - expected.loss.item()) < 1e-5


def test_trainer_loss_settings_the_preference_loss_replaces_are_refused():
    """``label_smoothing_factor`` and ``compute_loss_func`` act on the Trainer's own loss: they were dropped."""
    model = make_model(VOCAB, seed=1)
    common = dict(train_dataset=_dataset(), data_collator=collate, ref_model=frozen_copy(model))
    with pytest.raises(ValueError, match="`label_smoothing_factor` is 0.1"):
        PrefTrainer(model=model, args=_args(label_smoothing_factor=0.1), **common)
    with pytest.raises(ValueError, match="`compute_loss_func` would never be called"):
        PrefTrainer(model=model, args=_args(), compute_loss_func=lambda *a, **k: 0.0, **common)


def test_reference_model_runs_without_dropout():
    """A reference built in train mode (``from_config``) ran its dropout: a different reference every step."""
    model, ref = make_model(VOCAB, seed=1), make_model(VOCAB, seed=1)
    for layer in ref.model.layers:
        layer.self_attn.attention_dropout = 0.5
    ref.train()
    trainer = PrefTrainer(model=model.eval(), args=_args(), train_dataset=_dataset(), data_collator=collate,
                          ref_model=ref, fastpref_loss="dpo")
    assert not trainer.ref_model.training
    batch = collate([_dataset()[i] for i in range(4)])
    with torch.no_grad():
        losses = [trainer.compute_loss(model, batch).item() for _ in range(2)]
    assert abs(losses[0] - math.log(2)) < 1e-5 and losses[0] == losses[1], losses  # policy == reference


def test_reference_with_another_logit_transform_is_refused():
    """The fused pass applies the policy's softcap / logit scale to the reference head too."""
    model, ref = make_model(VOCAB, seed=1), make_model(VOCAB, seed=1)
    ref.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="`ref_model` scales / soft-caps its logits"):
        PrefTrainer(model=model, args=_args(), train_dataset=_dataset(), data_collator=collate, ref_model=ref)
    with pytest.raises(ValueError, match="`ref_model` scales / soft-caps its logits"):
        fastpref_compute_loss(model, collate([_dataset()[i] for i in range(2)]), "dpo", ref_model=ref)


def test_evaluation_under_another_prefix_does_not_leak_into_the_next():
    """evaluate(metric_key_prefix="test") left its metrics stored; the next evaluate() averaged them in."""
    model = make_model(VOCAB, seed=1)
    ref = frozen_copy(model)
    trainer = PrefTrainer(model=model, args=_args(per_device_eval_batch_size=4), train_dataset=_dataset(),
                          eval_dataset=_dataset(4, seed=5), data_collator=_mask_collate, ref_model=ref,
                          fastpref_loss="dpo")
    fresh = trainer.evaluate()
    test = trainer.evaluate(eval_dataset=_dataset(4, seed=9), metric_key_prefix="test")
    assert "eval_rewards/margins" in test and test["eval_logps/chosen"] != fresh["eval_logps/chosen"]
    again = trainer.evaluate()
    assert again["eval_logps/chosen"] == pytest.approx(fresh["eval_logps/chosen"], abs=1e-6)
