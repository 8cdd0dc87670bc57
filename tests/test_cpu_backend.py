"""The C++ CPU row kernels (csrc/, fastpref.ops.cpu) against the fp64 oracle and the PyTorch backend.

Tolerances. fp32: every statistic within 1e-5 of the oracle relative to the scale of the log-probs
(max |logp| + 1, which sets the size of fp32 rounding in lse, entropy, KL, ...), every gradient
within 1e-5 of the oracle relative to its largest entry (observed: <= 1.2e-6).

bf16 / fp16 inputs: the chunk logits and dz are stored in the input dtype (as the PyTorch backend
does; bf16 keeps 8 significant bits, so a logit near 8 is off by up to 2^-5). Against the oracle,
statistics are within 2^-6 (bf16) / 2^-9 (fp16) of the logit scale and gradients within 2^-5 (bf16,
observed 1.4e-2) / 2^-9 (fp16, observed 8e-4) of their largest entry. Against the PyTorch backend,
which rounds the same logits, statistics agree to 1e-5 and gradients to two rounding steps.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest
import torch

import fastpref
from fastpref.ops import cpu, dispatch, rows_torch
from fastpref.ops.dispatch import Want
from fastpref.ops.reference import reference_token_stats

needs_cpp = pytest.mark.skipif(not cpu.AVAILABLE, reason=f"C++ kernels not built: {cpu.IMPORT_ERROR}")

ALL_WANT = Want(entropy=True, log_sum_sq_probs=True, mean_logits=True, is_top1=True, ref_entropy=True, kl=True)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STAT_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-6, torch.float16: 2**-9}  # vs the oracle
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-5, torch.float16: 2**-9}  # vs the oracle
STEP = {torch.float32: 2**-23, torch.bfloat16: 2**-7, torch.float16: 2**-10}  # one rounding step, relative


def test_extension_is_built():
    """Fails rather than skips when a C++ compiler is here but the kernels did not build or load."""
    if not cpu.AVAILABLE and shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: fastpref runs on its PyTorch row kernels")
    assert cpu.AVAILABLE, f"fastpref.ops._cpu_rows did not load: {cpu.IMPORT_ERROR}"
    assert fastpref.backends()["cpp"]
    assert dispatch.resolve(torch.device("cpu"))[0] == "cpp"
    assert cpu.isa() in cpu.supported_isas()
    assert cpu.supported_isas()[-1] == "baseline"


@pytest.fixture(params=cpu.supported_isas() or ["none"])
def isa(request):
    """Runs a test once per kernel variant this CPU supports (AVX-512, AVX2, baseline)."""
    if not cpu.AVAILABLE:
        pytest.skip(f"C++ kernels not built: {cpu.IMPORT_ERROR}")
    before = cpu.isa()
    cpu.select_isa(request.param)
    yield request.param
    cpu.select_isa(before)


def assert_close(actual, expected, rtol, scale=None, name=""):
    """max |actual - expected| <= rtol * scale (default: the largest |expected|, at least 1e-30)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = float(expected.abs().max()) if scale is None else float(torch.as_tensor(scale).detach())
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert err <= rtol * max(scale, 1e-30), f"{name}: max error {err:.3g} > {rtol:.3g} * {scale:.3g}"


# ---------------------------------------------------------------- direct row-kernel tests


def _logits(rows, vocab, dtype, seed, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=g) * spread
    zr = z + torch.randn(rows, vocab, generator=g) * 0.7  # a nearby reference, so KL is moderate
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[0] = z[0].argmax()  # at least one top-1 hit
    return z.to(dtype), zr.to(dtype), y


def _z(x, softcap, post_scale):
    x = x.double()
    return post_scale * softcap * torch.tanh(x / softcap) if softcap else x


def _oracle_rows(z, zr, y, softcap, post_scale):
    """Every statistic of the row contract in fp64, from the (exact) stored logits."""
    z, zr = _z(z, softcap, post_scale), _z(zr, softcap, post_scale)
    lp, lpr = z.log_softmax(-1), zr.log_softmax(-1)
    p, pr = lp.exp(), lpr.exp()
    return {
        "lse": z.logsumexp(-1), "logp": lp.gather(1, y[:, None])[:, 0], "entropy": -(p * lp).sum(-1),
        "log_sum_sq_probs": (p * p).sum(-1).log(), "mean_logits": z.mean(-1), "is_top1": z.argmax(-1) == y,
        "ref_lse": zr.logsumexp(-1), "ref_logp": lpr.gather(1, y[:, None])[:, 0],
        "ref_entropy": -(pr * lpr).sum(-1), "kl": (pr * (lpr - lp)).sum(-1),
    }


VOCABS = [1, 7, 17, 511, 512, 513, 1031]  # below / at / across the 512-value blocks, primes, no vector multiple


@needs_cpp
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [0.0, 4.0])
def test_forward_rows_vs_fp64(isa, vocab, dtype, softcap):
    z, zr, y = _logits(5, vocab, dtype, seed=vocab)
    post_scale = 0.8 if softcap else 1.0
    out = cpu.forward_rows(z, y, want=ALL_WANT, ref_logits=zr, softcap=softcap, post_scale=post_scale)
    oracle = _oracle_rows(z, zr, y, softcap, post_scale)
    assert set(out) == set(oracle)
    scale = oracle["lse"].abs().max() + 1.0
    for key, expected in oracle.items():
        if key == "is_top1":
            assert torch.equal(out[key], expected), key
        else:
            assert out[key].dtype == torch.float32
            assert_close(out[key], expected, 1e-6, scale=scale, name=key)


@needs_cpp
@pytest.mark.parametrize("want", [Want(), Want(entropy=True), Want(is_top1=True, mean_logits=True), ALL_WANT], ids=str)
@pytest.mark.parametrize("with_ref", [False, True])
def test_forward_rows_returns_what_torch_backend_returns(want, with_ref):
    z, zr, y = _logits(6, 300, torch.float32, seed=1)
    kwargs = dict(want=want, ref_logits=zr if with_ref else None)
    out, expected = cpu.forward_rows(z, y, **kwargs), rows_torch.forward_rows(z, y, **kwargs)
    assert set(out) == set(expected)
    for key in expected:
        assert out[key].dtype == expected[key].dtype and out[key].shape == expected[key].shape, key
        assert_close(out[key], expected[key], 1e-6, scale=8.0, name=key)


@needs_cpp
def test_is_top1_first_maximum_wins(isa):
    vocab = 1500
    z = torch.zeros(6, vocab)
    for row, cols in enumerate([(3, 700), (700, 3), (5, 9), (520, 1400), (1499,), (0, 1499)]):
        z[row, list(cols)] = 2.0
    y = torch.tensor([3, 700, 9, 520, 1499, 1499])
    out = cpu.forward_rows(z, y, want=Want(is_top1=True))
    assert out["is_top1"].tolist() == [True, False, False, True, True, False]
    assert torch.equal(out["is_top1"], z.argmax(-1) == y)


@needs_cpp
def test_forward_rows_large_logits_stay_finite(isa):
    z = torch.tensor([[1000.0, 999.0, -1000.0, 0.0], [-500.0, -501.0, -502.0, -503.0]])
    y = torch.tensor([0, 3])
    out = cpu.forward_rows(z, y, want=ALL_WANT, ref_logits=z.flip(-1))
    oracle = _oracle_rows(z, z.flip(-1), y, 0.0, 1.0)
    for key, expected in oracle.items():
        assert torch.isfinite(out[key].float()).all(), key
        if key != "is_top1":
            assert_close(out[key], expected, 1e-6, scale=1000.0, name=key)


def _oracle_dz(z, zr, y, g, softcap, post_scale):
    """dL/dlogits in fp64 by autograd, L = sum g_logp logp + g_entropy H + g_kl KL."""
    x = z.double().requires_grad_()
    lp, lpr = _z(x, softcap, post_scale).log_softmax(-1), _z(zr, softcap, post_scale).log_softmax(-1)
    loss = 0.0
    if "g_logp" in g:
        loss = loss + (g["g_logp"].double() * lp.gather(1, y[:, None])[:, 0]).sum()
    if "g_entropy" in g:
        loss = loss + (g["g_entropy"].double() * -(lp.exp() * lp).sum(-1)).sum()
    if "g_kl" in g:
        loss = loss + (g["g_kl"].double() * (lpr.exp() * (lpr - lp)).sum(-1)).sum()
    (dz,) = torch.autograd.grad(loss, x)
    return dz


GRADS = [("g_logp",), ("g_entropy",), ("g_kl",), ("g_logp", "g_entropy", "g_kl")]


@needs_cpp
@pytest.mark.parametrize("vocab", [1, 17, 513, 1031])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [0.0, 4.0])
@pytest.mark.parametrize("grads", GRADS, ids="+".join)
def test_backward_rows_vs_fp64_and_torch(isa, vocab, dtype, softcap, grads):
    z, zr, y = _logits(5, vocab, dtype, seed=vocab + 1)
    post_scale = 0.8 if softcap else 1.0
    stats = cpu.forward_rows(z, y, want=ALL_WANT, ref_logits=zr, softcap=softcap, post_scale=post_scale)
    gen = torch.Generator().manual_seed(7)
    g = {k: torch.randn(5, generator=gen) for k in grads}
    kwargs = dict(
        entropy=stats["entropy"] if "g_entropy" in g else None,
        ref_logits=zr.clone() if "g_kl" in g else None,
        ref_lse=stats["ref_lse"] if "g_kl" in g else None,
        softcap=softcap, post_scale=post_scale, **g,
    )
    dz = z.clone()
    cpu.backward_rows_(dz, y, stats["lse"], **kwargs)
    expected = _oracle_dz(z, zr, y, g, softcap, post_scale)
    # dz is O(g p); with one class it is exactly zero, so the scale never drops below max|g| / V
    scale = max(float(expected.abs().max()), max(float(v.abs().max()) for v in g.values()) / vocab)
    # fp32: fp32 rounding; bf16/fp16: the final rounding of dz to the storage dtype
    rtol = 1e-5 if dtype == torch.float32 else STEP[dtype]
    assert_close(dz, expected, rtol, scale=scale, name="dz vs fp64")
    # the PyTorch backend rounds the same fp32 gradient: at most one step of the dtype apart
    dz_torch = z.clone()
    rows_torch.backward_rows_(dz_torch, y, stats["lse"], **kwargs)
    assert_close(dz, dz_torch, rtol, scale=scale, name="dz vs torch")


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [0.0, 4.0])
def test_backward_rows_on_vocabulary_slices(isa, dtype, softcap):
    """Slices [v0, v1) of the rows, with the full rows' lse / entropy / ref_lse and target - v0 (outside
    the slice: no one-hot term), give the same dz as the whole rows."""
    vocab = 1100
    z, zr, y = _logits(6, vocab, dtype, seed=11)
    y[1], y[2], y[3] = 0, vocab - 1, 300  # on the slice edges
    kwargs = dict(softcap=softcap, post_scale=0.8 if softcap else 1.0)
    stats = cpu.forward_rows(z, y, want=ALL_WANT, ref_logits=zr, **kwargs)
    g = {k: torch.randn(6, generator=torch.Generator().manual_seed(3)) for k in ("g_logp", "g_entropy", "g_kl")}
    rows = dict(entropy=stats["entropy"], ref_lse=stats["ref_lse"], **g, **kwargs)
    whole = z.clone()
    cpu.backward_rows_(whole, y, stats["lse"], ref_logits=zr, **rows)
    sliced = z.clone()
    for v0, v1 in [(0, 300), (300, 813), (813, vocab)]:
        cpu.backward_rows_(sliced[:, v0:v1], y - v0, stats["lse"], ref_logits=zr[:, v0:v1], **rows)
    assert_close(sliced, whole, 1e-6 if dtype == torch.float32 else STEP[dtype], name="sliced dz")


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
def test_rows_with_stride_and_noncontiguous_last_dim():
    z, zr, y = _logits(4, 600, torch.float32, seed=3)
    padded = torch.full((4, 700), 123.0)
    padded[:, :600] = z  # row stride 700 != vocab
    view = padded[:, :600]
    out = cpu.forward_rows(view, y, want=ALL_WANT, ref_logits=zr.t().contiguous().t())  # column-major reference
    expected = rows_torch.forward_rows(z, y, want=ALL_WANT, ref_logits=zr)
    for key in expected:
        assert_close(out[key], expected[key], 1e-6, scale=8.0, name=key)
    cpu.backward_rows_(view, y, out["lse"], g_logp=torch.ones(4))
    dz = z.clone()
    rows_torch.backward_rows_(dz, y, out["lse"], g_logp=torch.ones(4))
    assert_close(view, dz, 1e-6, name="dz")
    assert torch.all(padded[:, 600:] == 123.0)
    column_major = z.t().contiguous().t()
    cpu.backward_rows_(column_major, y, out["lse"], g_logp=torch.ones(4))
    assert_close(column_major, dz, 1e-6, name="dz (column-major)")


@needs_cpp
def test_threads_split_rows_without_changing_results():
    z, zr, y = _logits(64, 5003, torch.float32, seed=5)  # large enough for several parallel tasks
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
    z, _, y = _logits(3, 50, torch.float32, seed=0)
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


@needs_cpp
def test_empty_chunk():
    out = cpu.forward_rows(torch.empty(0, 10), torch.empty(0, dtype=torch.long), want=ALL_WANT)
    assert out["lse"].shape == (0,)
    cpu.backward_rows_(torch.empty(0, 10), torch.empty(0, dtype=torch.long), torch.empty(0), g_logp=torch.empty(0))


# ---------------------------------------------------------------- through fastpref.token_stats


@dataclasses.dataclass
class Case:
    tokens: tuple[int, int]  # labels shape [B, T]
    d: int
    vocab: int
    stats: dict = dataclasses.field(default_factory=dict)  # extra token_stats flags
    ref: bool = False
    bias: bool = True
    ignore: float = 0.3  # fraction of ignored labels
    softcap: float | None = None
    scales: dict = dataclasses.field(default_factory=dict)  # logit_scale / temperature
    chunk_size: int | None = 7
    logits_budget: int = 0
    frozen: bool = False  # weight (and bias) without gradient: the LoRA path

    def __str__(self):
        parts = [f"{self.tokens[0]}x{self.tokens[1]}-d{self.d}-V{self.vocab}"]
        parts += [k for k, v in self.stats.items() if v]
        parts += ["ref"] * self.ref + ["nobias"] * (not self.bias) + [f"cap{self.softcap}"] * bool(self.softcap)
        parts += [f"{k}{v}" for k, v in self.scales.items()] + ["kept"] * bool(self.logits_budget)
        return "-".join(parts + ["frozen"] * self.frozen + [f"ignore{self.ignore}"] * (self.ignore != 0.3))


FULL = dict(entropy=True, kl=True, ref_entropy=True, log_sum_sq_probs=True, mean_logits=True, is_top1=True)
CASES = [
    Case((2, 13), 16, 97),
    Case((3, 11), 64, 1031, dict(entropy=True)),
    Case((2, 9), 32, 509, FULL, ref=True),
    Case((2, 9), 32, 509, FULL, ref=True, logits_budget=1 << 30),
    Case((1, 17), 8, 3, FULL, ref=True, bias=False),
    Case((2, 8), 512, 257, dict(entropy=True, is_top1=True), logits_budget=1 << 30, chunk_size=None),
    Case((2, 10), 24, 600, FULL, ref=True, softcap=5.0, scales=dict(logit_scale=1.5, temperature=0.7)),
    Case((2, 10), 24, 600, dict(entropy=True), scales=dict(temperature=0.5), logits_budget=1 << 30),
    Case((1, 12), 40, 131, dict(entropy=True, kl=True), ref=True, frozen=True, bias=False),
    Case((1, 12), 40, 131, dict(entropy=True), softcap=3.0, frozen=True),
    Case((3, 5), 16, 211, FULL, ref=True, ignore=0.0),
    Case((1, 9), 16, 211, dict(entropy=True, kl=True), ref=True, ignore=-1),  # one valid token
]


def _inputs(case: Case, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = case.tokens
    hidden = torch.randn(*shape, case.d, generator=g)
    weight = torch.randn(case.vocab, case.d, generator=g) * (2.0 / case.d**0.5)
    bias = torch.randn(case.vocab, generator=g) * 0.5 if case.bias else None
    labels = torch.randint(0, case.vocab, shape, generator=g)
    if case.ignore < 0:  # exactly one valid token, in the middle
        only = labels.reshape(-1)[4].clone()
        labels.fill_(-100).reshape(-1)[4] = only
    else:
        labels[torch.rand(shape, generator=g) < case.ignore] = -100
    leaves = {"hidden": hidden.to(dtype).requires_grad_()}
    leaves["weight"] = weight.to(dtype).requires_grad_(not case.frozen)
    if bias is not None:
        leaves["bias"] = bias.to(dtype).requires_grad_(not case.frozen)
    ref_hidden = (hidden + 0.5 * torch.randn(*shape, case.d, generator=g)).to(dtype) if case.ref else None
    upstream = {k: torch.randn(shape, generator=g) for k in ("logp", "entropy", "kl")}
    return leaves, labels, ref_hidden, upstream


def _run(fn, case, leaves, labels, ref_hidden, upstream, **kwargs):
    """token_stats-like ``fn`` on the case; returns its outputs and the gradients of a random loss."""
    out = fn(
        leaves["hidden"], leaves["weight"], labels, bias=leaves.get("bias"), ref_hidden=ref_hidden,
        softcap=case.softcap, **case.stats, **case.scales, **kwargs,
    )
    loss = sum((getattr(out, k) * u).sum() for k, u in upstream.items() if getattr(out, k) is not None)
    params = [v for v in leaves.values() if v.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return out, dict(zip([k for k, v in leaves.items() if v.requires_grad], grads))


def _compare(case, dtype, fn_expected, stat_rtol, grad_rtol, **expected_kwargs):
    leaves, labels, ref_hidden, upstream = _inputs(case, dtype)
    out, grads = _run(
        fastpref.token_stats, case, leaves, labels, ref_hidden, upstream, backend="cpp",
        chunk_size=case.chunk_size, logits_budget=case.logits_budget,
    )
    expected, expected_grads = _run(fn_expected, case, leaves, labels, ref_hidden, upstream, **expected_kwargs)
    scale = expected.logp.abs().max() + 1.0
    for key in out._fields:
        got, want = getattr(out, key), getattr(expected, key)
        assert (got is None) == (want is None), key
        if got is None:
            continue
        assert got.shape == labels.shape, key
        assert got.dtype == (torch.bool if key == "is_top1" else torch.float32), key
        if key == "is_top1":
            assert torch.equal(got, want), key
        else:
            assert_close(got, want, stat_rtol, scale=scale, name=key)
            assert torch.all(got[labels == -100] == 0), f"{key} is not zero at ignored positions"
    assert set(grads) == set(expected_grads)
    for key, g in grads.items():
        assert g.dtype == leaves[key].dtype, key
        assert_close(g, expected_grads[key], grad_rtol, name=f"grad {key}")


@needs_cpp
@pytest.mark.parametrize("case", CASES, ids=str)
def test_token_stats_fp32_vs_oracle(case):
    _compare(case, torch.float32, reference_token_stats, 1e-5, 1e-5, compute_dtype=torch.float64)


@needs_cpp
@pytest.mark.parametrize("case", CASES, ids=str)
def test_token_stats_fp32_vs_torch_backend(case):
    def torch_backend(*args, **kwargs):
        return fastpref.token_stats(
            *args, backend="torch", chunk_size=case.chunk_size, logits_budget=case.logits_budget, **kwargs
        )

    _compare(case, torch.float32, torch_backend, 1e-5, 1e-5)


LOW_PRECISION_CASES = [CASES[2], CASES[6], CASES[8], CASES[3]]


@needs_cpp
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_token_stats_low_precision(case, dtype):
    # Rounding the chunk logits to bf16/fp16 creates ties that the oracle's fp64 logits do not have,
    # so is_top1 is compared with the PyTorch backend only (same stored logits, same first-max rule).
    no_top1 = dataclasses.replace(case, stats={**case.stats, "is_top1": False})
    _compare(no_top1, dtype, reference_token_stats, STAT_RTOL[dtype], GRAD_RTOL[dtype], compute_dtype=torch.float64)

    def torch_backend(*args, **kwargs):
        return fastpref.token_stats(
            *args, backend="torch", chunk_size=case.chunk_size, logits_budget=case.logits_budget, **kwargs
        )

    # the same stored logits as the PyTorch backend: statistics agree to fp32 rounding, gradients to
    # the rounding of dz to the storage dtype
    _compare(case, dtype, torch_backend, 1e-5, 2 * STEP[dtype])


@needs_cpp
def test_default_backend_on_cpu_is_cpp(monkeypatch):
    monkeypatch.delenv("FASTPREF_BACKEND", raising=False)
    case = CASES[2]
    leaves, labels, ref_hidden, upstream = _inputs(case, torch.float32)
    default, _ = _run(fastpref.token_stats, case, leaves, labels, ref_hidden, upstream)
    explicit, _ = _run(fastpref.token_stats, case, leaves, labels, ref_hidden, upstream, backend="cpp")
    for key in default._fields:
        if getattr(default, key) is not None:
            assert torch.equal(getattr(default, key), getattr(explicit, key)), key
