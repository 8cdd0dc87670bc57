"""FastPrefDPOTrainer against TRL's own DPOTrainer (step-by-step parity), MallowsPO and friends through
the trainer, the legacy dpo_loss mixin, and the version gate. Tiny random Llamas, CPU, fp32."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")

from integration_helpers import make_lists, make_model, make_pairs, make_tokenizer  # noqa: E402
from trainer_helpers import lora, train, trl_config  # noqa: E402

import fastpref  # noqa: E402
from fastpref.integrations import trl as fp_trl  # noqa: E402

VOCAB = 512
TRL_ONLY = {"learning_rate", "epoch"}


def _config(cls, **overrides):
    return trl_config(cls, **overrides)


def _train(trainer_cls, config_cls, *, precompute: bool, dataset=None, **overrides):
    return train(trainer_cls, config_cls, precompute=precompute, dataset=dataset, vocab=VOCAB, **overrides)


@pytest.mark.parametrize(
    "precompute, overrides",
    [
        (False, {}),
        (True, {"gradient_accumulation_steps": 2}),
        (False, {"loss_type": ["ipo", "hinge"], "loss_weights": [1.0, 0.5]}),
        (False, {"sync_ref_model": True, "ref_model_sync_steps": 2, "ref_model_mixup_alpha": 0.5}),
        (False, {"peft_config": "lora"}),
    ],
    ids=["ref_model", "precomputed+grad_accum", "ipo+hinge", "sync_ref_model", "lora"],
)
@pytest.mark.slow
def test_matches_trl_step_by_step(precompute, overrides, monkeypatch):
    from trl import DPOConfig, DPOTrainer

    from fastpref.integrations import _core

    if overrides.get("peft_config") == "lora":
        pytest.importorskip("peft")
        overrides = {**overrides, "peft_config": lora()}
    calls = []
    fused = _core.preference_loss
    monkeypatch.setattr(_core, "preference_loss", lambda *a, **k: calls.append(1) or fused(*a, **k))

    held_out = make_pairs(4, VOCAB, seed=9)
    ours_trainer, ours = _train(fp_trl.FastPrefDPOTrainer, fp_trl.FastPrefDPOConfig, precompute=precompute,
                                eval_dataset=held_out, **overrides)
    assert len(calls) == 4 * ours_trainer.args.gradient_accumulation_steps  # fastpref's loss ran, not TRL's
    theirs_trainer, theirs = _train(DPOTrainer, DPOConfig, precompute=precompute, eval_dataset=held_out, **overrides)
    assert len(ours) == len(theirs) == 4
    worst = {}
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert set(b) <= set(a), f"metrics missing at step {step}: {set(b) - set(a)}"
        # Before the first update policy == reference: every reward is 0 up to float noise, and the
        # accuracy indicator (chosen > rejected) of an exact tie is not a stable quantity to compare.
        tied = b["rewards/chosen"] == 0.0 and b["rewards/rejected"] == 0.0
        for key, value in b.items():
            if key == "rewards/accuracies" and tied:
                continue
            diff = abs(a[key] - value)
            worst[key] = max(worst.get(key, 0.0), diff)
            assert diff <= 1e-4, f"step {step} {key}: fastpref {a[key]} vs TRL {value}"
    assert worst["loss"] < 1e-5
    print({k: f"{v:.1e}" for k, v in worst.items() if k not in TRL_ONLY})
    evaluated, expected = ours_trainer.evaluate(), theirs_trainer.evaluate()
    for key, value in expected.items():
        if key.startswith("eval_") and not key.endswith(("_runtime", "_per_second")):
            assert abs(evaluated[key] - value) <= 1e-4, f"{key}: fastpref {evaluated[key]} vs TRL {value}"


def _trl_first_batch_stats(trainer, ref_model):
    """TRL's own fused-head per-token log-probs / entropies of the whole (single-batch) dataset."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels,
              "fused_lm_head": True}
    with torch.no_grad():
        policy = ref_model(**kwargs)  # step 1: the policy equals the reference
    mask = batch["completion_mask"][:, 1:].float()
    n = mask.sum(1)
    mean_logp = (policy.log_probs * mask).sum(1) / n
    mean_entropy = (policy.entropy * mask).sum(1) / n
    return mean_logp.chunk(2), mean_entropy.chunk(2)


@pytest.mark.parametrize("precompute", [True, False], ids=["precomputed", "ref_model"])
def test_mallows_through_trainer_matches_functional(precompute):
    """Step 1 of MallowsPO through the trainer == ``mallows_dpo_loss`` on TRL's own log-probs/entropies."""
    from trl.trainer.utils import add_fused_lm_head

    data = make_pairs(8, VOCAB, seed=3)
    kwargs = {"beta": 10.0, "reference_free": False}
    trainer, logs = _train(fp_trl.FastPrefDPOTrainer, fp_trl.FastPrefDPOConfig, precompute=precompute, dataset=data,
                           max_steps=1, per_device_train_batch_size=8, fastpref_loss="mallows_dpo",
                           fastpref_loss_kwargs=kwargs)
    if precompute:
        assert {"ref_chosen_entropy", "ref_rejected_entropy"} <= set(trainer.train_dataset.column_names)
    reference = make_model(VOCAB)  # the initial weights
    add_fused_lm_head(reference, outputs=("log_probs", "entropy"))
    (pc, pr), (hc, hr) = _trl_first_batch_stats(trainer, reference)
    psi = fastpref.neg_log_dispersion(hc, hr, vocab_size=VOCAB, c=0.29)
    loss, chosen, rejected = fastpref.mallows_dpo_loss(pc, pr, pc, pr, neg_log_dispersion=psi, beta=10.0)
    assert abs(logs[0]["loss"] - loss.item()) < 1e-5
    assert abs(logs[0]["neg_log_dispersion"] - psi.mean().item()) < 1e-5
    assert abs(logs[0]["rewards/chosen"] - chosen.mean().item()) < 1e-5


@pytest.mark.parametrize("loss, kwargs, data", [
    ("simpo", {"beta": 2.0, "gamma_beta_ratio": 0.5}, "pairs"),
    ("tdpo2", {}, "pairs"),
    ("pro", {}, "lists"),
])
def test_other_losses_train(loss, kwargs, data):
    dataset = make_pairs(8, VOCAB) if data == "pairs" else make_lists(6, 3, VOCAB)
    _, logs = _train(fp_trl.FastPrefDPOTrainer, fp_trl.FastPrefDPOConfig, precompute=False, dataset=dataset,
                     max_steps=2, fastpref_loss=loss, fastpref_loss_kwargs=kwargs)
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert "entropy" in logs[0]


def test_list_loss_with_precomputed_reference():
    trainer, logs = _train(fp_trl.FastPrefDPOTrainer, fp_trl.FastPrefDPOConfig, precompute=True,
                           dataset=make_lists(6, 3, VOCAB), max_steps=1, fastpref_loss="lipo_lambda")
    assert "ref_logps" in trainer.train_dataset.column_names
    assert len(trainer.train_dataset[0]["ref_logps"]) == 3
    assert math.isfinite(logs[0]["loss"])


def test_train_demo_refuses_calibration_it_cannot_do():
    with pytest.raises(ValueError, match="calibrate_dispersion"):
        fp_trl.train_demo(make_model(VOCAB), make_tokenizer(VOCAB), make_pairs(8, VOCAB), loss="simpo",
                          calibrate_dispersion=True)
    # a dispersion_c of the user's would have been replaced; a config field would have overridden an argument
    with pytest.raises(ValueError, match="calibrate_dispersion"):
        fp_trl.train_demo(make_model(VOCAB), make_tokenizer(VOCAB), make_pairs(8, VOCAB),
                          loss_kwargs={"dispersion_c": 0.29}, calibrate_dispersion=True)
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        fp_trl.train_demo(make_model(VOCAB), make_tokenizer(VOCAB), make_pairs(8, VOCAB), batch_size=4,
                          per_device_train_batch_size=2)


def test_train_demo_runs_mallows():
    trainer, history = fp_trl.train_demo(make_model(VOCAB), make_tokenizer(VOCAB), make_pairs(8, VOCAB),
                                         max_steps=3, batch_size=4, calibrate_dispersion=True)
    losses = [h["loss"] for h in history if "loss" in h and "train_loss" not in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # calibrated on the whole dataset so that mean psi = 1; one batch of 4 pairs stays close to it
    assert 0.5 < history[0]["neg_log_dispersion"] < 2.0
    assert trainer.fastpref.hparams["dispersion_c"] > 0.29


def test_unsupported_settings_fail_clearly():
    with pytest.raises(ValueError, match="ld_alpha"):
        _config(fp_trl.FastPrefDPOConfig, ld_alpha=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        _config(fp_trl.FastPrefDPOConfig, label_smoothing=0.1)
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        _config(fp_trl.FastPrefDPOConfig, fastpref_loss="tdpo2", precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="loss"):
        _config(fp_trl.FastPrefDPOConfig, fastpref_loss="no_such_loss")
    # a plain DPOConfig is checked too when the trainer reads it
    from trl import DPOConfig

    with pytest.raises(ValueError, match="ld_alpha"):
        fp_trl.loss_from_config(_config(DPOConfig, ld_alpha=0.5))


def test_missing_batch_column_fails_before_the_precompute():
    """A misspelt column used to be dropped silently (MMPO trained plain DPO); now the trainer refuses it."""
    data = make_pairs(8, VOCAB).add_column("soft_labels", [0.7] * 8)
    args = _config(fp_trl.FastPrefDPOConfig, fastpref_loss="mmpo", fastpref_batch_columns=["soft_labels"],
                   precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match=r"'soft_labels' is not a column of train_dataset.*'prompt'"):
        fp_trl.FastPrefDPOTrainer(make_model(VOCAB), args=args, train_dataset=make_pairs(8, VOCAB),
                                  processing_class=make_tokenizer(VOCAB))
    with pytest.raises(ValueError, match=r"eval_dataset"):
        fp_trl.FastPrefDPOTrainer(make_model(VOCAB), args=args, train_dataset=data,
                                  eval_dataset=make_pairs(4, VOCAB), processing_class=make_tokenizer(VOCAB))


def test_batch_columns_reach_the_loss():
    """MMPO with soft labels 0.5 has zero gradient at the reference (policy = reference): the policy never moves
    and the loss stays log 2; without the column (p = 1, plain DPO) it moves after the first step."""
    data = make_pairs(8, VOCAB).add_column("soft_labels", [0.5] * 8)
    losses = {}
    for columns in (["soft_labels"], None):
        _, logs = _train(fp_trl.FastPrefDPOTrainer, fp_trl.FastPrefDPOConfig, precompute=False, dataset=data,
                         max_steps=2, per_device_train_batch_size=8, fastpref_loss="mmpo",
                         fastpref_loss_kwargs={"beta": 1.0}, fastpref_batch_columns=columns)
        losses[bool(columns)] = [h["loss"] for h in logs]
    assert all(abs(x - math.log(2)) < 1e-6 for x in losses[True]), losses
    assert abs(losses[False][1] - math.log(2)) > 1e-3, losses


def test_list_examples_whose_prompt_fills_max_length_are_dropped():
    """Truncation used to empty a response and fail mid-training; such examples are dropped up front (as TRL)."""
    data = make_lists(6, 3, VOCAB)
    longest = max(len(p.split()) for p in data["prompt"])
    with pytest.warns(UserWarning, match="dropped"):
        trainer, logs = _train(fp_trl.FastPrefDPOTrainer, fp_trl.FastPrefDPOConfig, precompute=False, dataset=data,
                               max_steps=2, per_device_train_batch_size=2, fastpref_loss="pro",
                               max_length=longest)
    assert 0 < len(trainer.train_dataset) < 6
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)


def test_version_gate(monkeypatch):
    monkeypatch.setattr(fp_trl, "trl_version", lambda: "0.28.1")
    with pytest.raises(RuntimeError, match="FastPrefLegacyDPOMixin"):
        fp_trl.check_trl("trainer")
    assert fp_trl.check_trl("legacy") == "0.28.1"
    monkeypatch.setattr(fp_trl, "trl_version", lambda: "2.1.0")
    with pytest.raises(RuntimeError, match="trl<2"):
        fp_trl.check_trl("trainer")
    with pytest.raises(RuntimeError, match="FastPrefDPOTrainer"):
        fp_trl.check_trl("legacy")


def test_fastpref_imports_without_trl_or_transformers():
    code = (
        "import sys\n"
        "for m in ('trl', 'transformers', 'accelerate', 'datasets', 'deepspeed'): sys.modules[m] = None\n"
        "import fastpref, fastpref.integrations, fastpref.integrations.trl, fastpref.integrations.hf\n"
        "import fastpref.integrations.collators, fastpref.ops.vocab_parallel\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_reference_columns_sums_match_trainer_precompute():
    """The standalone helper stores the same summed log-probs and entropies as the trainer's precompute."""
    trainer, _ = _train(fp_trl.FastPrefDPOTrainer, fp_trl.FastPrefDPOConfig, precompute=True,
                        dataset=make_pairs(8, VOCAB, seed=3), max_steps=1, per_device_train_batch_size=8,
                        fastpref_loss="mallows_dpo", fastpref_loss_kwargs={"reference_free": False})
    tokenised = trainer.train_dataset.remove_columns(
        ["ref_chosen_logps", "ref_rejected_logps", "ref_chosen_entropy", "ref_rejected_entropy"])
    again = fp_trl.reference_columns(make_model(VOCAB), tokenised, pad_token_id=0, batch_size=3)
    for key in ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_entropy", "ref_rejected_entropy"):
        assert torch.allclose(torch.tensor(again[key]), torch.tensor(trainer.train_dataset[key]), atol=1e-4), key


@pytest.mark.slow
def test_bf16_autocast_matches_trl():
    """bf16=True (accelerate's autocast): token_stats runs the head in bf16 as TRL's fused head does."""
    from trl import DPOConfig, DPOTrainer

    _, ours = _train(fp_trl.FastPrefDPOTrainer, fp_trl.FastPrefDPOConfig, precompute=False, bf16=True, max_steps=2)
    _, theirs = _train(DPOTrainer, DPOConfig, precompute=False, bf16=True, max_steps=2)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            # measured: loss within 1e-5, summed log-probs within 5e-5 relative (same bf16 logits, other fp32 sums)
            assert abs(a[key] - b[key]) <= 2e-3 * (1 + abs(b[key])), f"step {step} {key}: {a[key]} vs {b[key]}"


@pytest.mark.parametrize("data", ["pairs", "lists"])
def test_reference_columns_of_the_dataset_are_ignored_without_precompute(data):
    """TRL reads ``ref_*`` columns only with precompute_ref_log_probs=True; without it, stale columns in the dataset
    (a previous run's, another reference's) used to replace the reference model: step 1 (policy == reference)
    trained on made-up log-ratios instead of ln 2."""
    if data == "pairs":
        dataset = make_pairs(8, VOCAB).add_column("ref_chosen_logps", [0.0] * 8).add_column(
            "ref_rejected_logps", [-50.0] * 8)
        loss = None
    else:
        dataset = make_lists(4, 3, VOCAB).add_column("ref_logps", [[0.0, -50.0, -9.0]] * 4)
        loss = "dpo_plackett_luce"
    with pytest.warns(UserWarning, match="precompute_ref_log_probs=False ignores"):
        _, logs = _train(fp_trl.FastPrefDPOTrainer, fp_trl.FastPrefDPOConfig, precompute=False, dataset=dataset,
                         max_steps=1, fastpref_loss=loss)
    if data == "pairs":
        assert abs(logs[0]["loss"] - math.log(2)) < 1e-4 and logs[0]["rewards/chosen"] == 0.0, logs[0]
    else:
        assert abs(logs[0]["loss"] - math.log(6)) < 1e-4, logs[0]  # Plackett-Luce of 3 tied responses: ln 3!


def test_list_loss_pad_token_is_checked_like_trl():
    """List losses build their own collator, where TRL's check of ``pad_token`` never ran."""
    args = _config(fp_trl.FastPrefDPOConfig, fastpref_loss="pro", pad_token="<nope>")
    with pytest.raises(ValueError, match="`pad_token` \\('<nope>'\\) is not in the vocabulary"):
        fp_trl.FastPrefDPOTrainer(make_model(VOCAB), ref_model=make_model(VOCAB), args=args,
                                  train_dataset=make_lists(4, 3, VOCAB), processing_class=make_tokenizer(VOCAB))


# ---- the legacy mixin's dpo_loss, on a look-alike of the legacy DPOTrainer (the real one: test_trl_legacy.py) ----


class _LegacyLike:
    """What a legacy DPOTrainer (TRL 0.12 - 0.28) hands its ``dpo_loss``: its config, ``loss_type`` and the batch."""

    def __init__(self, **args):
        from types import SimpleNamespace

        settings = dict(beta=0.1, label_smoothing=0.0, f_divergence_type="reverse_kl", f_alpha_divergence_coef=1.0,
                        discopop_tau=0.05, reference_free=False, loss_type=["sigmoid"])
        settings.update(args)
        self.args = SimpleNamespace(**settings)
        self.loss_type = settings["loss_type"]
        self.model = SimpleNamespace(config=SimpleNamespace(vocab_size=VOCAB))

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        losses, chosen, rejected = self.dpo_loss(batch["pc"], batch["pr"], batch["rc"], batch["rr"], self.loss_type[0])
        return losses, {"chosen": chosen, "rejected": rejected}


def _legacy(loss="dpo", **args):
    class Trainer(fp_trl.FastPrefLegacyDPOMixin, _LegacyLike):
        fastpref_loss = loss

    return Trainer(**args)


def _legacy_batch():
    g = torch.Generator().manual_seed(0)
    return {k: -torch.rand(4, generator=g) * 30 for k in ("pc", "pr", "rc", "rr")}


def test_legacy_reference_free_is_honoured_as_trl():
    """TRL: loss log-ratios ``logp - (not reference_free) * ref``, rewards ``beta * (logp - ref)``; it was dropped."""
    b = _legacy_batch()
    losses, metrics = _legacy(reference_free=True, beta=0.2).get_batch_loss_metrics(None, b)
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(0.2 * (b["pc"] - b["pr"])))
    torch.testing.assert_close(metrics["chosen"], 0.2 * (b["pc"] - b["rc"]))
    with pytest.raises(ValueError, match="`reference_free` is a setting of TRL's DPO loss.*'simpo'"):
        _legacy("simpo", reference_free=True).get_batch_loss_metrics(None, b)
    with pytest.raises(ValueError, match=r"fastpref_loss_kwargs=\{'reference_free': True\}"):
        _legacy("mallows_dpo", reference_free=True).get_batch_loss_metrics(None, b)


def test_legacy_loss_conventions_fastpref_does_not_share_are_refused():
    b = _legacy_batch()
    with pytest.raises(ValueError, match="`loss_type` 'bco_pair' of legacy TRL subtracts a running mean"):
        _legacy(loss_type=["bco_pair"]).get_batch_loss_metrics(None, b)
    with pytest.raises(ValueError, match=r"`f_divergence_type`.*'f_alpha_divergence_coef': 0.7\}") as err:
        _legacy(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3).get_batch_loss_metrics(None, b)
    assert "(u_l^-a - u_w^-a) / a" in str(err.value)
    # the suggested settings are legacy TRL's alpha-divergence loss, (u_l^-a - u_w^-a) / a with a = 0.3
    trainer = _legacy(fastpref_loss_kwargs=None)
    trainer.fastpref_loss_kwargs = {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.7}
    losses, _ = trainer.get_batch_loss_metrics(None, b)
    chosen, rejected = b["pc"] - b["rc"], b["pr"] - b["rr"]
    logits = (torch.exp(-0.3 * rejected) - torch.exp(-0.3 * chosen)) / 0.3
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(0.1 * logits))
