"""FastPrefKTOTrainer against TRL's own KTOTrainer, step by step (loss and every metric TRL logs), and the
cross-rank averaging of the KTO metrics. Tiny random Llamas, CPU, fp32."""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("trl")

from trainer_helpers import lora, make_unpaired, train  # noqa: E402

from fastpref.integrations import trl as fp_trl  # noqa: E402
from fastpref.integrations._core import gather_metrics  # noqa: E402

VOCAB = 512
# Batches of 4 in order (TRL's sequential sampler): all desirable, mixed, mostly undesirable, all undesirable.
LABELS = [1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0]
TRL_ONLY = {"learning_rate", "epoch", "grad_norm"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "precompute, overrides",
    [
        (False, {}),
        (True, {"gradient_accumulation_steps": 2}),
        (False, {"loss_type": "apo_zero_unpaired", "desirable_weight": 1.3, "undesirable_weight": 0.6}),
        (True, {"beta": 0.5, "desirable_weight": 0.8}),
        (False, {"peft_config": "lora"}),
    ],
    ids=["ref_model", "precomputed+grad_accum", "apo_zero_unpaired+weights", "precomputed+beta", "lora"],
)
def test_matches_trl_kto_step_by_step(precompute, overrides):
    from trl import KTOConfig, KTOTrainer

    if overrides.get("peft_config") == "lora":
        pytest.importorskip("peft")
        overrides = {**overrides, "peft_config": lora()}
    data, held_out = make_unpaired(LABELS, VOCAB), make_unpaired([1, 0, 0, 1, 0, 1], VOCAB, seed=7)
    settings = dict(precompute=precompute, dataset=data, eval_dataset=held_out, vocab=VOCAB, **overrides)
    ours_trainer, ours = train(fp_trl.FastPrefKTOTrainer, fp_trl.FastPrefKTOConfig, **settings)
    theirs_trainer, theirs = train(KTOTrainer, KTOConfig, **settings)
    assert len(ours) == len(theirs) == 4
    if precompute:
        assert "ref_logps" in ours_trainer.train_dataset.column_names
    worst = {}
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert set(b) <= set(a), f"metrics missing at step {step}: {set(b) - set(a)}"
        for key, value in b.items():
            diff = abs(a[key] - value)
            worst[key] = max(worst.get(key, 0.0), diff)
            assert diff <= 1e-4, f"step {step} {key}: fastpref {a[key]} vs TRL {value}"
    assert worst["loss"] < 1e-5
    # fastpref's loss ran, not TRL's: it also logs the chosen tokens' top-1 accuracy, which TRL's KTO does not
    assert any("mean_token_accuracy" in a for a in ours) and not any("mean_token_accuracy" in b for b in theirs)
    # the all-desirable / all-undesirable batches log no rejected / chosen means (as TRL)
    assert "rewards/rejected" not in ours[0] or overrides.get("gradient_accumulation_steps")
    # evaluation after training: the same eval_* metrics (the eval set's reference precomputed by fastpref too)
    evaluated, expected = ours_trainer.evaluate(), theirs_trainer.evaluate()
    assert {k for k in expected if not k.endswith(("_runtime", "_per_second"))} <= set(evaluated)
    for key, value in expected.items():
        if key.startswith("eval_") and not key.endswith(("_runtime", "_per_second")):
            assert abs(evaluated[key] - value) <= 1e-4, f"{key}: fastpref {evaluated[key]} vs TRL {value}"
    print({k: f"{v:.1e}" for k, v in worst.items() if k not in TRL_ONLY})


def _two_ranks(fn):
    """Run ``fn(rank, gather)`` on two threads whose ``gather`` is an all-gather (concatenation in rank order)."""
    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def gather(x):
        rank = threading.current_thread().rank
        slots[rank] = x
        barrier.wait()
        out = torch.cat(slots)
        barrier.wait()
        return out

    def run(rank):
        threading.current_thread().rank = rank
        results[rank] = fn(rank, gather)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_gathered_metrics_follow_trl_across_ranks():
    """Per-example means weighted by each rank's examples, token means by tokens, whatever metrics each rank has."""
    t = torch.tensor
    # rank 0: 3 desirable examples (rewards 1, 2, 3), none undesirable, 10 tokens; rank 1: one desirable (5),
    # two undesirable (mean -1), 30 tokens; its metrics come in another order; no rank has rejected tokens
    local = [
        ({"rewards/chosen": t(2.0), "entropy": t(1.0), "kl": t(0.5), "logits/rejected": t(0.0)},
         {"rewards/chosen": t(3), "rewards/rejected": t(0), "entropy": t(10), "logits/rejected": t(0)}),
        ({"kl": t(0.5), "rewards/rejected": t(-1.0), "logits/rejected": t(0.0), "entropy": t(2.0),
          "rewards/chosen": t(5.0)},
         {"rewards/rejected": t(2), "entropy": t(30), "rewards/chosen": t(1), "logits/rejected": t(0)}),
    ]
    results = _two_ranks(lambda rank, gather: gather_metrics(*local[rank], gather, empty=None))
    assert results[0] == results[1]
    assert results[0]["rewards/chosen"] == pytest.approx((1 + 2 + 3 + 5) / 4)  # TRL: sum over ranks / count
    assert results[0]["rewards/rejected"] == pytest.approx(-1.0)
    assert results[0]["entropy"] == pytest.approx((10 * 1.0 + 30 * 2.0) / 40)
    assert results[0]["kl"] == pytest.approx(0.5) and "logits/rejected" not in results[0]
    dpo_style = _two_ranks(lambda rank, gather: gather_metrics(*local[rank], gather))
    assert dpo_style[0]["logits/rejected"] == 0.0  # TRL's DPOTrainer logs 0.0 for an empty token metric


def _ddp_matches_trl(rank):
    from trl import KTOConfig, KTOTrainer

    # each rank gets its own examples of every batch, so the desirable counts differ across ranks
    data = make_unpaired(LABELS, VOCAB)
    settings = dict(precompute=False, dataset=data, vocab=VOCAB, per_device_train_batch_size=2, ddp_backend="gloo")
    trainer, ours = train(fp_trl.FastPrefKTOTrainer, fp_trl.FastPrefKTOConfig, **settings)
    assert trainer.accelerator.num_processes == 2
    _, theirs = train(KTOTrainer, KTOConfig, **settings)
    assert len(ours) == len(theirs) == 4
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert set(b) <= set(a), f"metrics missing at step {step}: {set(b) - set(a)}"
        for key, value in b.items():
            assert abs(a[key] - value) <= 1e-4, f"rank {rank} step {step} {key}: fastpref {a[key]} vs TRL {value}"


@pytest.mark.slow
def test_matches_trl_kto_under_ddp():
    """Two processes (gloo): the reference point averaged over ranks before the clamp, and every metric, as TRL."""
    from integration_helpers import spawn

    spawn(_ddp_matches_trl, world=2)
