"""The row-kernel contract (fastpref.ops.backend.RowKernels), once, for every registered backend that can
run here — against the fp64 oracle, directly on chunks of logits and through ``fastpref.token_stats``.

Tensors live on ``FASTPREF_TEST_DEVICE`` (default cpu; the GPU check sets cuda). Without CUDA the Triton
kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), hence the small shapes.

Tolerances. Statistics of a chunk are computed in fp32 from the stored logits, which the oracle reads
exactly: within 2e-6 of the log-sum-exp's scale (max |lse| + 1) in every dtype. dL/dlogits is fp32 math
rounded once to the storage dtype: within 1e-5 of its largest entry (fp32), one rounding step of the
dtype (bf16 2^-7, the interpreter truncates; fp16 2^-10). Through token_stats, fp32 values and gradients
are within 1e-5 of the fp64 oracle; bf16 / fp16 round the chunk logits as the model's own head would:
statistics within 2^-6 (bf16) / 2^-9 (fp16) of the log-prob scale, gradients within 2^-5 / 2^-9.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fastpref
from fastpref.ops import backend as registry
from fastpref.ops.backend import Want
from fastpref.ops.reference import reference_token_stats
from oracle import ALL_WANT, DEVICE, chunk, rel_err, row_oracle

# Every registered backend (fastpref.ops.register_backend) that can run tensors on DEVICE in this process.
BACKENDS = [name for name in fastpref.backends()
            if DEVICE in registry.get_backend(name).devices and registry.get_backend(name).runs_on(torch.device(DEVICE))
            and registry.kernels(name) is not None]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STEP = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}  # dz: one rounding step
STAT_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-6, torch.float16: 2**-9}  # token_stats vs the oracle
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-5, torch.float16: 2**-9}
VOCABS = [1, 7, 513, 1031, 4099]  # one column; tails below, at and across the 512 / 4096-wide blocks


@pytest.fixture(params=BACKENDS)
def rows(request):
    return registry.kernels(request.param)


def _close(got, want, tol, scale, name):
    err = (got.detach().double().cpu() - want.detach().double().cpu()).abs().max().item() if want.numel() else 0.0
    scale = scale.detach() if isinstance(scale, torch.Tensor) else scale
    assert err <= tol * max(float(scale), 1e-30), f"{name}: max error {err:.3g} > {tol:.3g} * {float(scale):.3g}"


def _check_stats(got: dict, want: dict, tol: float = 2e-6):
    assert set(got) == set(want), (sorted(got), sorted(want))
    scale = want["lse"].abs().max() + 1.0
    for k, v in want.items():
        assert got[k].shape == v.shape, k
        if k == "is_top1":
            assert got[k].dtype == torch.bool and torch.equal(got[k].cpu(), v.cpu()), k
        else:
            assert got[k].dtype == torch.float32, k
            _close(got[k], v, tol, scale, k)


def _kernel_args(softcap):
    return dict(softcap=softcap, post_scale=1 / 0.7 if softcap else 1.0)  # post_scale = 1 / temperature


# ---- forward ----


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [0.0, 5.0], ids=["plain", "softcap"])
def test_forward_rows_vs_oracle(rows, vocab, dtype, softcap):
    z, zr, y = chunk(5, vocab, dtype, seed=vocab)
    args = _kernel_args(softcap)
    _check_stats(rows.forward_rows(z, y, want=ALL_WANT, ref_logits=zr, **args), row_oracle(z, y, zr, **args))


WANTS = [Want()] + [Want(**{f.name: True}) for f in dataclasses.fields(Want)] + [ALL_WANT]


@pytest.mark.parametrize("want", WANTS, ids=lambda w: "+".join(k for k, v in dataclasses.asdict(w).items() if v) or "none")
@pytest.mark.parametrize("with_ref", [True, False], ids=["ref", "noref"])
def test_forward_rows_computes_exactly_what_is_asked(rows, want, with_ref):
    z, zr, y = chunk(4, 257, torch.float32, seed=1)
    zr = zr if with_ref else None
    _check_stats(rows.forward_rows(z, y, want=want, ref_logits=zr), row_oracle(z, y, zr, want=want))


def test_is_top1_first_maximum_wins(rows):
    vocab = 4099  # ties inside one block and across blocks
    z = torch.randn(6, vocab, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    top = z.max() + 1.0
    y = torch.tensor([10, 10, 4097, 4097, 3, 4098], device=DEVICE)
    z[0, [10, 20]] = top  # target first: top-1
    z[1, [5, 10]] = top  # earlier tie in the same block: not top-1
    z[2, [4097, 4098]] = top  # target first, both in the last block
    z[3, [100, 4097]] = top  # earlier tie in the first block
    z[4, 3] = top  # unique maximum
    z[5, 0] = top  # target is not the maximum
    got = rows.forward_rows(z, y, want=Want(is_top1=True))["is_top1"]
    assert got.tolist() == (z.argmax(dim=-1) == y).tolist() == [True, False, True, False, True, False]


def test_forward_rows_large_logits(rows):
    """|z| up to ~120 (the running max moves by large steps) and rows at +-1000: every statistic finite."""
    z, zr, y = chunk(6, 4099, torch.float32, seed=2, spread=30.0)
    got, want = rows.forward_rows(z, y, want=ALL_WANT, ref_logits=zr), row_oracle(z, y, zr)
    for k in ("lse", "logp", "ref_lse", "ref_logp"):
        assert rel_err(got[k], want[k]) < 1e-5, k
    for k in ("entropy", "ref_entropy", "kl"):  # O(1) values next to O(100) logits: absolute error
        assert (got[k].cpu() - want[k]).abs().max().item() < 2e-4, k
    # At |z| = 1000 an fp32 log-prob carries ulp(1000) = 6e-5 of representation error, so the KL of two
    # far-apart rows (|z_ref - z| ~ 2000) is good to ~1e-4 of the logit scale, not 2e-6.
    extreme = torch.tensor([[1000.0, 999.0, -1000.0, 0.0], [-500.0, -501.0, -502.0, -503.0]], device=DEVICE)
    target = torch.tensor([0, 3], device=DEVICE)
    _check_stats(rows.forward_rows(extreme, target, want=ALL_WANT, ref_logits=extreme.flip(-1)),
                 row_oracle(extreme, target, extreme.flip(-1)), tol=1e-4)


# ---- backward ----


def _upstream(n, names, seed=5):
    g = torch.Generator().manual_seed(seed)
    return {f"g_{k}": torch.randn(n, generator=g).to(DEVICE) for k in names}


def _dz(rows, z, y, zr, grads, *, softcap=0.0, post_scale=1.0, columns=None):
    """dz from the backend's backward_rows_, fed by its own forward statistics; ``columns`` runs it on
    vocabulary slices ``[(v0, v1), ...]`` with the full rows' statistics and ``target - v0``."""
    stats = rows.forward_rows(z, y, want=ALL_WANT, ref_logits=zr, softcap=softcap, post_scale=post_scale)
    dz = z.clone()
    for v0, v1 in columns or [(0, z.shape[1])]:
        rows.backward_rows_(
            dz[:, v0:v1], y - v0, stats["lse"], entropy=stats["entropy"] if "g_entropy" in grads else None,
            ref_logits=zr[:, v0:v1].clone() if "g_kl" in grads else None,
            ref_lse=stats["ref_lse"] if "g_kl" in grads else None, softcap=softcap, post_scale=post_scale, **grads,
        )
    return dz


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [0.0, 5.0], ids=["plain", "softcap"])
def test_backward_rows_vs_oracle(rows, vocab, dtype, softcap):
    z, zr, y = chunk(5, vocab, dtype, seed=vocab + 1)
    args = _kernel_args(softcap)
    grads = _upstream(5, ("logp", "entropy", "kl"))
    dz = _dz(rows, z, y, zr, grads, **args)
    assert dz.dtype == dtype
    _, want = row_oracle(z, y, zr, upstream=grads, **args)
    # dz is O(g p); with one column it is exactly zero, so the scale never drops below max|g| / V
    scale = max(want.abs().max().item(), max(g.abs().max().item() for g in grads.values()) / vocab)
    _close(dz, want, STEP[dtype], scale, "dz")


@pytest.mark.parametrize("names", [("logp",), ("entropy",), ("kl",), ("logp", "entropy")], ids="+".join)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_backward_rows_each_coefficient(rows, names, dtype):
    z, zr, y = chunk(5, 1000, dtype, seed=3)
    grads = _upstream(5, names)
    _, want = row_oracle(z, y, zr, upstream=grads)
    _close(_dz(rows, z, y, zr, grads), want, STEP[dtype], want.abs().max(), "dz")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [0.0, 4.0], ids=["plain", "softcap"])
def test_backward_rows_on_vocabulary_slices(rows, dtype, softcap):
    """Slices ``[v0, v1)`` with the full rows' lse / entropy / ref_lse and ``target - v0`` (a target outside
    the slice adds no one-hot term) give the whole rows' dz."""
    vocab = 1100
    z, zr, y = chunk(6, vocab, dtype, seed=11)
    y[1], y[2], y[3] = 0, vocab - 1, 300  # on the slice edges
    args = _kernel_args(softcap)
    grads = _upstream(6, ("logp", "entropy", "kl"))
    whole = _dz(rows, z, y, zr, grads, **args)
    sliced = _dz(rows, z, y, zr, grads, columns=[(0, 300), (300, 813), (813, vocab)], **args)
    _close(sliced, whole, 1e-6 if dtype == torch.float32 else STEP[dtype], whole.abs().max(), "sliced dz")


def test_backward_rows_target_term_in_fp32(rows):
    """p_y = 1 - 2.5e-4 rounds to 1.0 in bf16: ``1 - p_y`` must come from fp32 math, not a rounded p_y."""
    z = torch.zeros(2, 300)
    z[:, 7] = 14.0
    z = z.to(torch.bfloat16).to(DEVICE)
    y = torch.tensor([7, 8], device=DEVICE)
    dz = _dz(rows, z, y, None, {"g_logp": torch.ones(2, device=DEVICE)})
    p_other = 1.0 / (torch.tensor(14.0, dtype=torch.float64).exp().item() + 299)
    assert dz[0, 7].item() == pytest.approx(299 * p_other, rel=2**-7)  # 1 - p_y
    assert dz[0, 8].item() == pytest.approx(-p_other, rel=2**-7)
    assert dz[1, 7].item() == pytest.approx(-(1 - 299 * p_other), rel=2**-7)
    assert dz[1, 8].item() == pytest.approx(1 - p_other, rel=2**-7)


def test_strided_and_non_contiguous_rows(rows):
    """A row stride larger than V (a slice of a wider buffer) and a column-major chunk give the same results;
    nothing outside the rows is written."""
    z, zr, y = chunk(4, 600, torch.float32, seed=3)
    padded = torch.full((4, 700), 123.0, device=DEVICE)
    padded[:, :600] = z
    view = padded[:, :600]
    want = row_oracle(z, y, zr)
    _check_stats(rows.forward_rows(view, y, want=ALL_WANT, ref_logits=zr.t().contiguous().t()), want)
    grads = {"g_logp": torch.ones(4, device=DEVICE)}
    _, dz = row_oracle(z, y, upstream=grads, want=Want())
    lse = want["lse"].float().to(DEVICE)
    rows.backward_rows_(view, y, lse, **grads)
    _close(view, dz, 1e-5, dz.abs().max(), "dz (row stride 700)")
    assert torch.all(padded[:, 600:] == 123.0)
    column_major = z.t().contiguous().t()
    rows.backward_rows_(column_major, y, lse, **grads)
    _close(column_major, dz, 1e-5, dz.abs().max(), "dz (column-major)")


def test_empty_chunk(rows):
    z = torch.empty(0, 11, device=DEVICE)
    y = torch.empty(0, dtype=torch.long, device=DEVICE)
    out = rows.forward_rows(z, y, want=ALL_WANT, ref_logits=z)
    assert set(out) == set(row_oracle(torch.zeros(1, 11), torch.zeros(1, dtype=torch.long), torch.zeros(1, 11)))
    assert all(v.shape == (0,) for v in out.values())
    rows.backward_rows_(z, y, out["lse"], g_logp=out["lse"])


# ---- through fastpref.token_stats ----


@dataclasses.dataclass
class Case:
    tokens: tuple[int, int]  # labels shape [B, T]
    d: int
    vocab: int
    stats: dict = dataclasses.field(default_factory=dict)  # extra token_stats flags
    ref: bool = False
    bias: bool = True
    ignore: float = 0.3  # fraction of ignored labels (< 0: exactly one valid token)
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
    Case((1, 9), 16, 211, dict(entropy=True, kl=True), ref=True, ignore=-1),
    Case((2, 9), 32, 509, dict(entropy=True, kl=True), ref=True, logits_budget=6 * 509 * 4 * 2),  # partly kept
    Case((1, 6), 16, 300, dict(kl=True), ref=True, frozen=True, chunk_size=1),  # frozen, one stat, 1-row chunks
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
    leaves = {"hidden": hidden.to(dtype).to(DEVICE).requires_grad_()}
    leaves["weight"] = weight.to(dtype).to(DEVICE).requires_grad_(not case.frozen)
    if bias is not None:
        leaves["bias"] = bias.to(dtype).to(DEVICE).requires_grad_(not case.frozen)
    ref_hidden = (hidden + 0.5 * torch.randn(*shape, case.d, generator=g)).to(dtype).to(DEVICE) if case.ref else None
    grads = {k: torch.randn(shape, generator=g).to(DEVICE) for k in ("logp", "entropy", "kl")}
    return leaves, labels.to(DEVICE), ref_hidden, grads


def _run(fn, case, leaves, labels, ref_hidden, grads, **kwargs):
    """token_stats-like ``fn`` on the case; its outputs and the gradients of a random weighted sum."""
    out = fn(leaves["hidden"], leaves["weight"], labels, bias=leaves.get("bias"), ref_hidden=ref_hidden,
             softcap=case.softcap, **case.stats, **case.scales, **kwargs)
    loss = sum((getattr(out, k).double() * u.double()).sum() for k, u in grads.items() if getattr(out, k) is not None)
    params = [v for v in leaves.values() if v.requires_grad]
    return out, dict(zip([k for k, v in leaves.items() if v.requires_grad], torch.autograd.grad(loss, params)))


def _compare(case, dtype, backend, fn_expected, stat_rtol, grad_rtol, **expected_kwargs):
    leaves, labels, ref_hidden, grads = _inputs(case, dtype)
    out, got_grads = _run(fastpref.token_stats, case, leaves, labels, ref_hidden, grads, backend=backend,
                          chunk_size=case.chunk_size, logits_budget=case.logits_budget)
    expected, expected_grads = _run(fn_expected, case, leaves, labels, ref_hidden, grads, **expected_kwargs)
    scale = expected.logp.abs().max() + 1.0
    for key in out._fields:
        got, want = getattr(out, key), getattr(expected, key)
        assert (got is None) == (want is None), key
        if got is None:
            continue
        assert got.shape == labels.shape and got.dtype == (torch.bool if key == "is_top1" else torch.float32), key
        if key == "is_top1":
            assert torch.equal(got, want), key
        else:
            _close(got, want, stat_rtol, scale, key)
            assert torch.all(got[labels == -100] == 0), f"{key} is not zero at ignored positions"
    assert set(got_grads) == set(expected_grads)
    for key, g in got_grads.items():
        assert g.dtype == leaves[key].dtype, key
        _close(g, expected_grads[key], grad_rtol, expected_grads[key].abs().max(), f"grad {key}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_token_stats_fp32_vs_oracle(backend, case):
    _compare(case, torch.float32, backend, reference_token_stats, 1e-5, 1e-5, compute_dtype=torch.float64)


LOW_PRECISION_CASES = [CASES[3], CASES[6], CASES[8], CASES[12]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_token_stats_low_precision(backend, case, dtype):
    # Rounding the chunk logits to bf16/fp16 creates ties that the oracle's fp64 logits do not have,
    # so is_top1 is compared with the PyTorch backend only (same stored logits, same first-max rule).
    no_top1 = dataclasses.replace(case, stats={**case.stats, "is_top1": False})
    _compare(no_top1, dtype, backend, reference_token_stats, STAT_RTOL[dtype], GRAD_RTOL[dtype],
             compute_dtype=torch.float64)

    def torch_backend(*args, **kwargs):
        return fastpref.token_stats(*args, backend="torch", chunk_size=case.chunk_size,
                                    logits_budget=case.logits_budget, **kwargs)

    # the same stored logits as the PyTorch backend: statistics agree to fp32 rounding, gradients to the
    # rounding of dz to the storage dtype (twice: the interpreter truncates)
    _compare(case, dtype, backend, torch_backend, 1e-5, 2 * STEP[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["recompute", "kept", "frozen"])
def test_vocabulary_rows_masked_by_a_minus_inf_bias_are_dropped_exactly(backend, path):
    """A -inf bias row has p = 0: every statistic and gradient equals the head without that row. The C++
    backward gave NaN gradients and every backend NaN entropies / KL (0 * inf) before."""
    g = torch.Generator().manual_seed(3)
    n, d, vocab = 12, 16, 37
    masked = torch.tensor([0, 5, 36])
    keep = torch.tensor([v for v in range(vocab) if v not in masked.tolist()])
    hidden, ref_hidden = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    weight, bias = torch.randn(vocab, d, generator=g) * 0.4, torch.randn(vocab, generator=g) * 0.5
    labels = keep[torch.randint(0, keep.numel(), (n,), generator=g)]
    labels[:2] = -100
    bias_inf = bias.clone().index_fill_(0, masked, float("-inf"))
    remap = torch.full((vocab,), -100).index_copy_(0, keep, torch.arange(keep.numel()))
    frozen = path == "frozen"
    options = dict(entropy=True, kl=True, ref_entropy=True, ref_hidden=ref_hidden.to(DEVICE), backend=backend,
                   logits_budget=1 << 30 if path == "kept" else 0)

    def run(w, b, y):
        h = hidden.to(DEVICE).requires_grad_()
        w = w.to(DEVICE).requires_grad_(not frozen)
        out = fastpref.token_stats(h, w, y.to(DEVICE), bias=b.to(DEVICE), **options)
        loss = (out.logp * 0.7 + out.entropy * 0.3 + out.kl * 0.5).sum() if frozen else (
            out.logp + out.entropy - out.kl).sum()
        grads = torch.autograd.grad(loss, [h] if frozen else [h, w])
        return out, grads

    got, got_grads = run(weight, bias_inf, labels)
    want, want_grads = run(weight[keep], bias[keep], torch.where(labels >= 0, remap[labels.clamp(min=0)], -100))
    for key in ("logp", "entropy", "ref_logp", "ref_entropy", "kl"):
        assert torch.allclose(getattr(got, key), getattr(want, key), atol=1e-5), key
    assert torch.allclose(got_grads[0], want_grads[0], atol=1e-5)
    if not frozen:
        assert torch.allclose(got_grads[1][keep], want_grads[1], atol=1e-5)
        assert torch.all(got_grads[1][masked] == 0)
