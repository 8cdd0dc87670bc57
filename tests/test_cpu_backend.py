"""What is particular to the C++ CPU row kernels (csrc/, fastpref.ops.cpu): the build, every instruction-set
variant against the fp64 oracle, threads, rounding and argument errors. The contract itself (every
backend, one set of cases) is tests/test_backends.py."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import fastpref
from fastpref.ops import backend as registry
from fastpref.ops import cpu
from fastpref.ops.backend import Want
from oracle import ALL_WANT, chunk, row_oracle

needs_cpp = pytest.mark.skipif(not cpu.AVAILABLE, reason=f"C++ kernels not built: {cpu.IMPORT_ERROR}")
STEP = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}  # dz rounded once (to nearest)


def test_extension_is_built():
    """Fails rather than skips when a C++ compiler is here but the kernels did not build or load."""
    if not cpu.AVAILABLE and shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: fastpref runs on its PyTorch row kernels")
    assert cpu.AVAILABLE, f"fastpref.ops._cpu_rows did not load: {cpu.IMPORT_ERROR}"
    assert fastpref.backends()["cpp"]
    assert cpu.isa() in cpu.supported_isas()
    assert cpu.supported_isas()[-1] == "baseline"


@needs_cpp
def test_default_backend_on_cpu_is_cpp(monkeypatch):
    monkeypatch.delenv("FASTPREF_BACKEND", raising=False)
    assert registry.resolve(torch.device("cpu")).name == "cpp"
    assert registry.resolve(torch.device("cpu"), dtype=torch.float64).name == "torch"  # fp32 kernels


@pytest.fixture(params=cpu.supported_isas() or ["none"])
def isa(request):
    """Runs a test once per kernel variant this CPU supports (AVX-512, AVX2, baseline)."""
    if not cpu.AVAILABLE:
        pytest.skip(f"C++ kernels not built: {cpu.IMPORT_ERROR}")
    before = cpu.isa()
    cpu.select_isa(request.param)
    yield request.param
    cpu.select_isa(before)


@pytest.mark.parametrize("vocab", [1, 17, 511, 512, 513, 1031])  # below / at / across the 512-value blocks
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("softcap", [0.0, 4.0])
def test_every_isa_meets_the_contract(isa, vocab, dtype, softcap):
    z, zr, y = chunk(5, vocab, dtype, seed=vocab, device="cpu")
    args = dict(softcap=softcap, post_scale=0.8 if softcap else 1.0)
    out = cpu.forward_rows(z, y, want=ALL_WANT, ref_logits=zr, **args)
    g = torch.Generator().manual_seed(7)
    grads = {k: torch.randn(5, generator=g) for k in ("g_logp", "g_entropy", "g_kl")}
    want, dz_want = row_oracle(z, y, zr, upstream=grads, **args)
    scale = want["lse"].abs().max() + 1.0
    for key, expected in want.items():
        if key == "is_top1":
            assert torch.equal(out[key], expected), key
        else:
            assert (out[key].double() - expected).abs().max() <= 1e-6 * scale, key
    dz = z.clone()
    cpu.backward_rows_(dz, y, out["lse"], entropy=out["entropy"], ref_logits=zr.clone(), ref_lse=out["ref_lse"],
                       **grads, **args)
    bound = max(dz_want.abs().max().item(), max(v.abs().max().item() for v in grads.values()) / vocab)
    assert (dz.double() - dz_want).abs().max() <= 2 * STEP[dtype] * bound


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_backward_target_gradient_is_rounded_once(isa, dtype):
    """dz[y] = g (1 - p_y) is formed in fp32 and rounded once; rounding -g p_y first and then adding g
    rounds twice (for bf16: 1 + bf16(-1/3) = 0.666015625 is a tie that rounds to 0.6640625, not 0.66796875)."""
    z = torch.zeros(2, 3, dtype=dtype)  # uniform: p = 1/3
    y = torch.tensor([1, 2])
    stats = cpu.forward_rows(z, y, want=Want())
    cpu.backward_rows_(z, y, stats["lse"], g_logp=torch.ones(2))
    once = torch.tensor(2.0 / 3.0).to(dtype)
    assert z[0, 1] == once and z[1, 2] == once
    assert torch.all(z[0, [0, 2]] == torch.tensor(-1.0 / 3.0).to(dtype))


@needs_cpp
def test_threads_split_rows_without_changing_results():
    z, zr, y = chunk(64, 5003, torch.float32, seed=5, device="cpu")  # enough rows for several parallel tasks
    threads = torch.get_num_threads()
    results = []
    for n in (1, max(2, threads)):
        torch.set_num_threads(n)
        try:
            stats = cpu.forward_rows(z, y, want=ALL_WANT, ref_logits=zr)
            dz = z.clone()
            cpu.backward_rows_(dz, y, stats["lse"], g_logp=torch.ones(64), g_kl=torch.ones(64),
                               ref_logits=zr, ref_lse=stats["ref_lse"])
        finally:
            torch.set_num_threads(threads)
        results.append((stats, dz))
    (one, dz_one), (many, dz_many) = results
    assert all(torch.equal(one[k], many[k]) for k in one)
    assert torch.equal(dz_one, dz_many)


@needs_cpp
def test_bad_arguments_raise_value_error():
    z, _, y = chunk(3, 50, torch.float32, seed=0, device="cpu")
    with pytest.raises(ValueError, match="target"):
        cpu.forward_rows(z, torch.tensor([0, 50, 1]), want=Want())
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        cpu.forward_rows(z.double(), y, want=Want())
    with pytest.raises(ValueError, match="ref_logits"):
        cpu.forward_rows(z, y, want=Want(), ref_logits=z[:2])
    with pytest.raises(ValueError, match="entropy"):
        cpu.backward_rows_(z, y, torch.zeros(3), g_entropy=torch.ones(3))
    with pytest.raises(ValueError, match="ref_logits"):
        cpu.backward_rows_(z, y, torch.zeros(3), g_kl=torch.ones(3))
