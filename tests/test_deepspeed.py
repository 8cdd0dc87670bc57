"""DeepSpeed ZeRO-3, for real: 2 CPU processes over gloo, the head partitioned (persistence threshold 0).

fastpref never calls ``lm_head``'s forward, so DeepSpeed's module hooks never gather the head: the
patched forward (``fastpref.integrations._head``) gathers it, and its backward accumulates the full
gradient, which ZeRO-3 then reduces and partitions. Checked against single-process runs: the loss,
every parameter's gradient and the optimizer step through ``deepspeed.initialize``, and the logged
losses and metrics of ``FastPrefDPOTrainer`` (with a ZeRO-3 reference model) step by step.

The first run on a machine compiles DeepSpeed's shared-memory comm op (about a minute; cached under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("trl")

from integration_helpers import (  # noqa: E402
    assert_max_diff, make_model, make_pairs, make_tokenizer, pair_batches, spawn)

pytestmark = pytest.mark.slow

WORLD = 2
VOCAB = 256
LR = 0.1
ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # partition the head too
    "zero_allow_untested_optimizer": True,
}


def _batches():
    return pair_batches(WORLD, VOCAB)


def _model():
    return make_model(vocab=VOCAB, hidden=32, layers=2, seed=0, bias=True)


def _engine_matches_single_process(rank):
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    import fastpref
    from fastpref.integrations.hf import fastpref_compute_loss

    batches = _batches()
    single = _model()
    want_loss = sum(fastpref_compute_loss(single, b, "dpo", backend="torch", beta=0.5).loss for b in batches) / WORLD
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in single.named_parameters()}

    model = _model()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                      config={"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0, **ZERO3})
    head = engine.module.lm_head
    assert head.weight.numel() == 0 and tuple(head.weight.ds_shape) == (VOCAB, 32)  # really partitioned

    out = fastpref_compute_loss(engine, batches[rank], "dpo", backend="torch", beta=0.5)
    assert head.weight.numel() == 0  # partitioned again after the forward
    engine.backward(out.loss)
    assert head.weight.numel() == 0 and head.bias.numel() == 0  # released once the gradient is accumulated
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    assert_max_diff(loss / WORLD, want_loss, 1e-6, "loss")
    for name, param in engine.module.named_parameters():
        assert_max_diff(safe_get_full_grad(param), want[name], 1e-6, f"grad {name}")
    engine.step()
    with deepspeed.zero.GatheredParameters([head.weight, head.bias]):
        assert_max_diff(head.weight, single.lm_head.weight - LR * want["lm_head.weight"], 1e-6,
                        "lm_head.weight after step")
        assert_max_diff(head.bias, single.lm_head.bias - LR * want["lm_head.bias"], 1e-6, "lm_head.bias after step")

    # Level 1 called directly with the partitioned parameter, outside any forward: refused, naming ZeRO-3.
    hidden = torch.randn(2, 5, 32)
    labels = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="ZeRO-3"):
        fastpref.token_stats(hidden, head.weight, labels)


def test_zero3_engine_matches_single_process():
    """deepspeed.initialize (ZeRO-3, head partitioned): loss, every full gradient and the SGD step."""
    spawn(_engine_matches_single_process, world=WORLD)


def _trainer_config(batch_size, **extra):
    from fastpref.integrations.trl import FastPrefDPOConfig

    return FastPrefDPOConfig(
        output_dir=tempfile.mkdtemp(prefix="fastpref-ds-"), max_steps=2, learning_rate=1e-2,
        per_device_train_batch_size=batch_size, logging_steps=1, save_strategy="no", report_to="none", seed=0,
        use_cpu=True, bf16=False, disable_tqdm=True, **extra,
    )


def _train(args):
    from fastpref.integrations.trl import FastPrefDPOTrainer

    model = _model()
    trainer = FastPrefDPOTrainer(model, ref_model=_model().eval(), args=args, train_dataset=make_pairs(4, VOCAB, seed=2),
                                 processing_class=make_tokenizer(VOCAB))
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]


def _trainer_matches(rank, want):
    os.environ["DS_ACCELERATOR"] = "cpu"
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto", **ZERO3}
    trainer, got = _train(_trainer_config(4 // WORLD, deepspeed=config))
    assert trainer.is_deepspeed_enabled
    for model in (trainer.model, trainer.ref_model):  # both really partitioned, the head included
        assert model.get_output_embeddings().weight.numel() == 0
    assert len(got) == len(want) == 2
    worst = {}
    for step, (a, b) in enumerate(zip(got, want)):
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                    "logps/rejected", "entropy"):
            assert abs(a[key] - b[key]) <= 2e-5 * max(1.0, abs(b[key])), \
                f"step {step} {key}: ZeRO-3 {a[key]} vs single process {b[key]}"
            worst[key] = max(worst.get(key, 0.0), abs(a[key] - b[key]))
    if rank == 0:
        print({k: f"{v:.1e}" for k, v in worst.items()})


def test_zero3_trainer_matches_single_process():
    """FastPrefDPOTrainer with deepspeed= (ZeRO-3 policy and reference) == one process on the same 4 pairs."""
    _, want = _train(_trainer_config(4))  # 4 pairs: every step sees all of them, on one rank or split over two
    spawn(_trainer_matches, want, world=WORLD)
