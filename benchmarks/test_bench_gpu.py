"""GPU benchmark (pytest-benchmark): the head cases of the GPU check, one fwd+bwd each at the Llama-3-8B head.

M = 8,192 tokens, d = 4,096, V = 128,256, bf16. The cases, their inputs, timing (CUDA events, median
after warm-up) and memory (peak allocated above the inputs, and beyond grad_W + grad_hidden) are
``benchmarks/gpu_check.py``'s (``HEAD_CASES``); that script is the one command to run on a GPU machine
(``./run.sh gpu-check``). Here the same cases are recorded by pytest-benchmark, with the milliseconds,
ratios and memory in ``extra_info``:

    pytest benchmarks/test_bench_gpu.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from gpu_check import HEAD_CASES, Skip, gpu_config, head_batch, head_shape, measure_head

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs a CUDA device")

CONFIG = gpu_config()
SHAPE = head_shape(CONFIG)


@pytest.fixture(scope="module")
def batch():
    return head_batch(CONFIG)


@pytest.fixture(scope="module")
def floor_ms(batch):
    return measure_head(HEAD_CASES["gemm_floor"], batch, "cuda", CONFIG.reps, CONFIG.warmup)["ms"]


@pytest.mark.parametrize("name", list(HEAD_CASES))
def test_head_fwd_bwd(benchmark, batch, floor_ms, name):
    case = HEAD_CASES[name]
    if case.needs:
        pytest.importorskip(case.needs)
    try:
        result = measure_head(case, batch, "cuda", CONFIG.reps, CONFIG.warmup)
    except Skip as reason:
        pytest.skip(str(reason))
    benchmark.group = f"head fwd+bwd, M={SHAPE.valid_tokens}, d={SHAPE.d}, V={SHAPE.vocab}, bf16"
    benchmark.extra_info.update(result, x_floor=result["ms"] / floor_ms, device=torch.cuda.get_device_name())

    def run():
        batch["hidden"].grad = batch["weight"].grad = None
        case.step(batch)
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=CONFIG.reps, warmup_rounds=1)
    assert batch["hidden"].grad is not None and batch["weight"].grad is not None
