"""pytest-benchmark suite: fwd+bwd of a DPO step at the LM head, CI-size shape.

    pytest benchmarks/test_bench_core.py --benchmark-only        # timings
    python -m fastpref bench                                     # the README table (real head sizes, memory)

Compare the cases of one run (ratios), not absolute times: these machines are shared.
"""

import pytest

from fastpref.benchmark import CASES, PRESETS, make_batch, step

SHAPE = PRESETS["ci"]


@pytest.mark.parametrize("case", CASES)
def test_dpo_step(benchmark, case):
    batch = make_batch(SHAPE)
    benchmark.group = f"dpo fwd+bwd, {SHAPE.valid_tokens} valid tokens, d={SHAPE.d}, V={SHAPE.vocab}"

    def reset():
        batch["hidden"].grad = batch["weight"].grad = None

    benchmark.pedantic(step, args=(case, batch), setup=reset, rounds=5, warmup_rounds=1)
    assert batch["weight"].grad is not None and batch["hidden"].grad is not None
