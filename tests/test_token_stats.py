"""Level 1: fused token statistics vs the materialising fp64 oracle (values and gradients), on the
portable and the default CPU backend (tests/test_backends.py runs every backend through the contract)."""

import pytest
import torch

import fastpref
from oracle import make_head, make_labels, rel_err, token_oracle, weighted_sum

BACKENDS = [b for b in ("torch", "cpp") if fastpref.backends()[b]]


@pytest.fixture(params=BACKENDS, autouse=True)
def backend(request, monkeypatch):
    """Every test of this file once per CPU backend (token_stats reads FASTPREF_BACKEND)."""
    monkeypatch.setenv("FASTPREF_BACKEND", request.param)
    return request.param


SHAPES = [  # (rows, seq, d, V)
    (2, 7, 8, 97),  # prime V, tiny d
    (3, 5, 64, 1000),
    (1, 33, 128, 2053),  # prime V, one chunk boundary inside a row block
    (2, 4, 256, 511),  # larger d
]


def _run(head, labels, grads, **options):
    """Fused stats and gradients w.r.t. every floating leaf in ``head`` (hidden, weight, bias)."""
    leaves = {k: v.detach().clone().requires_grad_(k in ("hidden", "weight", "bias")) for k, v in head.items()}
    stats = fastpref.token_stats(labels=labels, **leaves, **options)
    targets = [v for k, v in leaves.items() if v.requires_grad]
    loss = weighted_sum(stats, grads)
    gs = torch.autograd.grad(loss, targets) if loss.requires_grad else [None] * len(targets)
    return stats, dict(zip([k for k, v in leaves.items() if v.requires_grad], gs))


def _oracle_grads(head, labels, grads, **options):
    stats, h64 = token_oracle(head, labels, **options)
    targets = {k: v for k, v in h64.items() if v.requires_grad}
    gs = torch.autograd.grad(weighted_sum(stats, grads), list(targets.values()))
    return stats, dict(zip(targets, gs))


def _upstream(labels, names, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(labels.shape, generator=g, dtype=torch.float64) for k in names}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("stats_on", ["logp", "all"])
@pytest.mark.parametrize("budget", [0, 1 << 30], ids=["recompute", "keep"])
def test_fp32_matches_oracle(shape, stats_on, budget):
    rows, seq, d, vocab = shape
    full = stats_on == "all"
    head = make_head(rows, seq, d, vocab, bias=full, ref=full)
    labels = make_labels(rows, seq, vocab, prompt=2, pad=[1, 0, 3][:rows])
    opts = dict(entropy=full, kl=full, ref_entropy=full, log_sum_sq_probs=full, mean_logits=full, is_top1=full)
    names = ["logp", "entropy", "kl"] if full else ["logp"]
    up = _upstream(labels, names)
    stats, grads = _run(head, labels, up, logits_budget=budget, chunk_size=5, **opts)
    ref, ref_grads = _oracle_grads(head, labels, up, **opts)
    for name in stats._fields:
        got, want = getattr(stats, name), getattr(ref, name)
        assert (got is None) == (want is None), name
        if got is None:
            continue
        assert got.shape == labels.shape and got.dtype == (torch.bool if name == "is_top1" else torch.float32)
        if name == "is_top1":
            assert torch.equal(got, want)
        else:
            assert rel_err(got, want) < 1e-5, name
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < 1e-5, name


def test_ignored_positions_are_zero_and_get_no_gradient():
    head = make_head(2, 6, 16, 50, ref=True)
    labels = make_labels(2, 6, 50, prompt=3)
    h = head["hidden"].clone().requires_grad_(True)
    stats = fastpref.token_stats(h, head["weight"], labels, entropy=True, ref_hidden=head["ref_hidden"], kl=True,
                                 )
    for name in ("logp", "entropy", "ref_logp", "kl"):
        assert torch.all(getattr(stats, name)[:, :3] == 0)
    (stats.logp.sum() + stats.entropy.sum() + stats.kl.sum()).backward()
    assert torch.all(h.grad[:, :3] == 0) and h.grad[:, 3:].abs().sum() > 0


@pytest.mark.parametrize("valid", [1, 0])
def test_single_and_no_valid_token(valid):
    head = make_head(1, 4, 8, 30)
    labels = torch.full((1, 4), -100)
    labels[0, 2] = 7 if valid else -100
    h = head["hidden"].clone().requires_grad_(True)
    w = head["weight"].clone().requires_grad_(True)
    stats = fastpref.token_stats(h, w, labels, entropy=True)
    ref, h64 = token_oracle(head, labels, entropy=True)
    assert rel_err(stats.logp, ref.logp) < 1e-6 if valid else torch.all(stats.logp == 0)
    (stats.logp.sum() + stats.entropy.sum()).backward()  # stays connected to the graph even with no token
    assert (h.grad.abs().sum() > 0) == bool(valid) and (w.grad.abs().sum() > 0) == bool(valid)


@pytest.mark.parametrize("stats_on", ["logp", "all"])
def test_frozen_weight(stats_on):
    """LoRA case: weight.requires_grad=False -> no grad_W; one stat: pieces kept from the forward."""
    head = make_head(2, 9, 32, 301, ref=True)
    labels = make_labels(2, 9, 301, prompt=2)
    full = stats_on == "all"
    up = _upstream(labels, ["logp", "entropy", "kl"] if full else ["logp"])
    opts = dict(entropy=full, kl=full)
    h = head["hidden"].clone().requires_grad_(True)
    stats = fastpref.token_stats(h, head["weight"], labels, ref_hidden=head["ref_hidden"], ref_weight=head["ref_weight"],
                                 chunk_size=4, **opts)
    (grad_h,) = torch.autograd.grad(weighted_sum(stats, up), [h])
    ref, h64 = token_oracle(head, labels, **opts)
    (want,) = torch.autograd.grad(weighted_sum(ref, up), [h64["hidden"]])
    assert rel_err(grad_h, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partly_kept_logits_and_vocabulary_tiles(dtype):
    """Half the rows keep their logits, the rest are recomputed in (row block x vocabulary slice) tiles."""
    vocab, chunk = 2053, 5
    head = make_head(3, 20, 32, vocab, bias=True, ref=True, dtype=dtype)
    labels = make_labels(3, 20, vocab, prompt=1)
    up = _upstream(labels, ["logp", "entropy", "kl"])
    opts = dict(entropy=True, kl=True)
    budget = 30 * vocab * head["hidden"].element_size() * 2  # 30 rows of policy + reference logits
    stats, grads = _run(head, labels, up, logits_budget=budget, chunk_size=chunk, **opts)
    ref, ref_grads = _oracle_grads(head, labels, up, **opts)
    bound = 1e-5 if dtype == torch.float32 else BF16_GRAD_BOUND
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < bound, name


def test_detach_entropy_has_no_gradient():
    head = make_head(1, 5, 8, 40)
    labels = make_labels(1, 5, 40)
    h = head["hidden"].clone().requires_grad_(True)
    stats = fastpref.token_stats(h, head["weight"], labels, entropy=True, detach_entropy=True)
    assert not stats.entropy.requires_grad and stats.logp.requires_grad


def test_second_backward_recomputes_kept_logits():
    """Kept chunks are overwritten by dz in place; a retain_graph second backward must still be exact."""
    head = make_head(2, 6, 16, 77)
    labels = make_labels(2, 6, 77)
    h = head["hidden"].clone().requires_grad_(True)
    stats = fastpref.token_stats(h, head["weight"], labels, logits_budget=1 << 30, chunk_size=4)
    loss = stats.logp.sum()
    (g1,) = torch.autograd.grad(loss, [h], retain_graph=True)
    (g2,) = torch.autograd.grad(loss, [h])
    assert torch.allclose(g1, g2)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_scale_softcap_temperature(softcap):
    head = make_head(2, 5, 16, 123, bias=True, ref=True)
    labels = make_labels(2, 5, 123, prompt=1)
    opts = dict(entropy=True, kl=True, logit_scale=1.7, softcap=softcap, temperature=0.8)
    up = _upstream(labels, ["logp", "entropy", "kl"])
    stats, grads = _run(head, labels, up, **opts)
    ref, ref_grads = _oracle_grads(head, labels, up, **opts)
    for name in ("logp", "entropy", "ref_logp", "kl"):
        assert rel_err(getattr(stats, name), getattr(ref, name)) < 1e-5, name
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-5, name


# bf16: the fused op rounds the chunk logits to bf16 (as the model's own lm_head does) and does every
# statistic in fp32. Against the fp64 oracle on the same bf16 inputs the error is the logits'
# rounding: |d logp| <= 2 * 2^-8 * max|z| per token. Gradients come out of bf16 GEMMs: 3e-2 relative.
BF16_STAT_BOUND = 2 * 2**-8
BF16_GRAD_BOUND = 3e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("budget", [0, 1 << 30], ids=["recompute", "keep"])
def test_half_precision_bounds(dtype, budget):
    head = make_head(2, 16, 64, 1031, dtype=dtype, bias=True, ref=True)
    labels = make_labels(2, 16, 1031, prompt=3, pad=[2, 0])
    opts = dict(entropy=True, kl=True, ref_entropy=True)
    up = _upstream(labels, ["logp", "entropy", "kl"])
    stats, grads = _run(head, labels, up, logits_budget=budget, chunk_size=7, **opts)
    ref, ref_grads = _oracle_grads(head, labels, up, **opts)
    zmax = (head["hidden"].double() @ head["weight"].double().T).abs().max().item() + 1
    for name in ("logp", "entropy", "ref_logp", "ref_entropy", "kl"):
        err = (getattr(stats, name).double() - getattr(ref, name)).abs().max().item()
        assert err <= BF16_STAT_BOUND * zmax, (name, err)
    for name, g in grads.items():
        assert g.dtype == dtype
        assert rel_err(g, ref_grads[name]) < BF16_GRAD_BOUND, name


def test_grad_weight_accumulates_in_fp32():
    """Many small chunks: bf16 grad_W must not lose the sum to per-chunk rounding."""
    head = make_head(1, 64, 16, 50, dtype=torch.bfloat16)
    labels = make_labels(1, 64, 50)
    w = head["weight"].clone().requires_grad_(True)
    stats = fastpref.token_stats(head["hidden"], w, labels, chunk_size=1)
    (g,) = torch.autograd.grad(stats.logp.sum(), [w])
    ref, h64 = token_oracle(head, labels)
    (want,) = torch.autograd.grad(ref.logp.sum(), [h64["weight"]])
    assert rel_err(g, want) < 1e-2


def test_chunk_size_does_not_change_results():
    head = make_head(2, 10, 16, 200, ref=True)
    labels = make_labels(2, 10, 200, prompt=2)
    runs = [
        fastpref.token_stats(**head, labels=labels, kl=True, entropy=True, chunk_size=c)
        for c in (1, 3, 64)
    ]
    for other in runs[1:]:
        for name in ("logp", "entropy", "kl"):
            assert torch.allclose(getattr(runs[0], name), getattr(other, name), atol=1e-6)


def test_shift_labels():
    labels = torch.tensor([[1, 2, 3, -100]])
    assert fastpref.shift_labels(labels).tolist() == [[2, 3, -100, -100]]
