"""pytest-benchmark suite: one whole DPO optimizer step per batch layout, CI-size model and data.

    pytest benchmarks/test_bench_step.py --benchmark-only          # timings, one pass
    python -m fastpref.step_benchmark --preset report              # the README table (6 layers, d=512)

Every case trains the same model on the same batch: TRL's DPOTrainer, FastPrefDPOTrainer padded,
padding-free, shared prompt and both (:mod:`fastpref.step_benchmark`). Compare the cases of one run.
"""

import pytest

pytest.importorskip("trl")

from fastpref.step_benchmark import (  # noqa: E402
    CASES, LABELS, PRESETS, batch_sizes, make_trainer, optimizer_step, step_batch,
)

SHAPE = PRESETS["ci"]
_LOSSES: dict[str, list[float]] = {}


@pytest.mark.parametrize("case", CASES)
def test_dpo_optimizer_step(benchmark, case):
    trainer = make_trainer(case, SHAPE)
    batch = step_batch(trainer)
    benchmark.group = "one DPO optimizer step, CI size (fastpref.step_benchmark.PRESETS['ci'])"
    benchmark.extra_info["case"] = LABELS[case]
    benchmark.extra_info["backbone_positions"], benchmark.extra_info["real_tokens"] = batch_sizes(batch)
    losses = [optimizer_step(trainer, batch)]  # the warm-up step, untimed
    benchmark.pedantic(lambda: losses.append(optimizer_step(trainer, batch)), rounds=1, warmup_rounds=0)
    # step 1 from the same weights, step 2 after one update: equal losses in every layout
    first = _LOSSES.setdefault("first", losses)
    assert len(losses) == 2 and all(abs(a - b) < 1e-5 for a, b in zip(losses, first)), (losses, first)
