"""Distributed heads on CPU (gloo, 2 processes): vocabulary-parallel level 1 and preference losses, FSDP2
(head in the root unit, and as its own DTensor unit) and DDP through the integration's fused forward,
each against the single-process result (values and gradients). DeepSpeed ZeRO-3: tests/test_deepspeed.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import fastpref
from fastpref.ops.reference import reference_token_stats
from fastpref.ops.vocab_parallel import VocabParallel, shard_range
from integration_helpers import assert_max_diff, spawn

pytestmark = pytest.mark.slow  # spawns 2 processes per test

WORLD = 2


# ---------------------------------------------------------------- vocabulary parallel


def _head_data(vocab, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 7, d, generator=g)
    w = torch.randn(vocab, d, generator=g) / d**0.5 * 3
    b = torch.randn(vocab, generator=g) * 0.5
    hr = h + 0.3 * torch.randn(h.shape, generator=g)
    wr = w + 0.1 * torch.randn(w.shape, generator=g) / d**0.5
    y = torch.randint(0, vocab, (3, 7), generator=g)
    y[:, :2] = -100
    # Ties across shards: an all-zero hidden row has equal logits everywhere (argmax = token 0).
    h[2, 3] = 0
    y[2, 3] = 0
    h[2, 4] = 0
    y[2, 4] = vocab - 1
    return h, w, b, hr, wr, y


def _vocab_parallel_token_stats(rank):
    vocab = 1001  # uneven shards: 501 + 500
    h, w, b, hr, wr, y = _head_data(vocab)
    start, end = shard_range(vocab, rank, WORLD)
    vp = VocabParallel(vocab, start, end - start, backend="torch")
    asked = dict(entropy=True, kl=True, ref_entropy=True, log_sum_sq_probs=True, mean_logits=True, is_top1=True,
                 chunk_size=5)
    for softcap in (None, 4.0):
        hh, ws, bs = (t.clone().requires_grad_() for t in (h, w[start:end], b[start:end]))
        got = fastpref.token_stats(hh, ws, y, bias=bs, ref_hidden=hr, ref_weight=wr[start:end], softcap=softcap,
                                   vocab_parallel=vp, **asked)
        (got.logp * 1.3 + got.entropy * 0.7 + got.kl * 0.5).sum().backward()
        hf, wf, bf = (t.clone().requires_grad_() for t in (h, w, b))
        ref = fastpref.token_stats(hf, wf, y, bias=bf, ref_hidden=hr, ref_weight=wr, softcap=softcap, backend="torch",
                                   **asked)
        (ref.logp * 1.3 + ref.entropy * 0.7 + ref.kl * 0.5).sum().backward()
        oracle = reference_token_stats(h.double(), w.double(), y, bias=b.double(), ref_hidden=hr.double(),
                                       ref_weight=wr.double(), softcap=softcap, **{k: v for k, v in asked.items()
                                                                                   if k != "chunk_size"})
        for name in ("logp", "entropy", "ref_logp", "ref_entropy", "kl", "log_sum_sq_probs", "mean_logits"):
            where = f"(softcap={softcap})"
            assert_max_diff(getattr(got, name), getattr(ref, name), 2e-5, f"{name} vs single process {where}")
            assert_max_diff(getattr(got, name), getattr(oracle, name), 2e-5, f"{name} vs fp64 oracle {where}")
        assert torch.equal(got.is_top1, ref.is_top1)
        assert_max_diff(hh.grad, hf.grad, 2e-5, "grad hidden")
        assert_max_diff(ws.grad, wf.grad[start:end], 2e-5, "grad weight shard")
        assert_max_diff(bs.grad, bf.grad[start:end], 2e-5, "grad bias shard")

    # Without a bias the all-zero rows tie across both shards: the first maximum (token 0) wins.
    tied = fastpref.token_stats(h, w[start:end], y, is_top1=True, vocab_parallel=vp).is_top1
    assert tied[2, 3] and not tied[2, 4]
    assert torch.equal(tied, fastpref.token_stats(h, w, y, is_top1=True, backend="torch").is_top1)

    # Frozen head (LoRA-style): the hidden-space gradient pieces are summed over shards too.
    hh = h.clone().requires_grad_()
    got = fastpref.token_stats(hh, w[start:end], y, entropy=True, vocab_parallel=vp)
    (got.logp + got.entropy).sum().backward()
    hf = h.clone().requires_grad_()
    ref = fastpref.token_stats(hf, w, y, entropy=True, backend="torch")
    (ref.logp + ref.entropy).sum().backward()
    assert_max_diff(hh.grad, hf.grad, 2e-5, "frozen-head grad hidden")

    with pytest.raises(ValueError, match="labels"):
        fastpref.token_stats(h, w[start:end], torch.full_like(y, vocab), vocab_parallel=vp)

    # The default chunk size comes from the full vocabulary, so uneven shards agree on the chunks (one
    # collective each): with 20 KB chunks, 501 local rows would give 4-row chunks and 500 give 5.
    from fastpref.ops import Backend, register_backend
    from fastpref.ops.backend import kernels

    register_backend(Backend("torch_20kb_chunks", lambda: kernels("torch"), ("cpu",), chunk_bytes=4 * 500 * 5))
    small = VocabParallel(vocab, start, end - start, backend="torch_20kb_chunks")
    got = fastpref.token_stats(h, w[start:end], y, entropy=True, vocab_parallel=small)
    assert_max_diff(got.logp, fastpref.token_stats(h, w, y, backend="torch").logp, 2e-5, "default chunk size")


def _vocab_parallel_losses(rank):
    vocab = 640
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 9, 16, generator=g)
    w = torch.randn(vocab, 16, generator=g) / 4
    hr = h + 0.2 * torch.randn(h.shape, generator=g)
    y = torch.randint(0, vocab, (4, 9), generator=g)
    y[:, :3] = -100
    start, end = shard_range(vocab, rank, WORLD)
    vp = VocabParallel(vocab, start, end - start, backend="torch")
    for loss, kwargs in (("dpo", {}), ("tdpo2", {}), ("simpo", {}), ("mallows_dpo", {})):  # psi uses the full V
        hh, ws = h.clone().requires_grad_(), w[start:end].clone().requires_grad_()
        got = fastpref.preference_loss(hh, ws, y, loss=loss, ref_hidden=hr, ref_weight=w[start:end],
                                       trl_metrics=True, vocab_parallel=vp, **kwargs)
        got.loss.backward()
        hf, wf = h.clone().requires_grad_(), w.clone().requires_grad_()
        ref = fastpref.preference_loss(hf, wf, y, loss=loss, ref_hidden=hr, ref_weight=w, trl_metrics=True,
                                       backend="torch", **kwargs)
        ref.loss.backward()
        assert_max_diff(got.loss, ref.loss, 1e-5, f"{loss} loss")
        for key, value in ref.metrics.items():
            assert_max_diff(got.metrics[key], value, 1e-4, f"{loss} metric {key}")
        assert_max_diff(hh.grad, hf.grad, 1e-5, f"{loss} grad hidden")
        assert_max_diff(ws.grad, wf.grad[start:end], 1e-5, f"{loss} grad weight shard")


def _vocab_parallel(rank):
    _vocab_parallel_token_stats(rank)
    _vocab_parallel_losses(rank)


def test_vocab_parallel_matches_single_process():
    """Token statistics (values, grads, softcap, ties, frozen head) and pair losses with metrics."""
    spawn(_vocab_parallel, world=WORLD)


# ---------------------------------------------------------------- FSDP2 / DDP through the integration


def _model_and_batches():
    from integration_helpers import make_model, pair_batches

    return make_model(vocab=256, hidden=32, layers=2, seed=0, bias=True), pair_batches(WORLD)


def _single_process_grads(model, batches):
    from fastpref.integrations.hf import fastpref_compute_loss

    model.zero_grad()
    total = sum(fastpref_compute_loss(model, b, "dpo", backend="torch", beta=0.5).loss for b in batches) / len(batches)
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _full_grad(param):
    grad = param.grad
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


def _fsdp2(rank, separate_head):
    import copy

    from torch.distributed.fsdp import fully_shard

    from fastpref.integrations.hf import fastpref_compute_loss

    model, batches = _model_and_batches()
    reference = copy.deepcopy(model)
    want_loss, want = _single_process_grads(reference, batches)
    for layer in model.model.layers:
        fully_shard(layer)
    if separate_head:
        fully_shard(model.lm_head)
    fully_shard(model)
    out = fastpref_compute_loss(model, batches[rank], "dpo", backend="torch", beta=0.5)
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    assert_max_diff(loss / WORLD, want_loss, 1e-6, "loss")
    for name, param in model.named_parameters():
        assert_max_diff(_full_grad(param), want[name], 1e-6, f"grad {name}")


def _ddp(rank):
    import copy

    from torch.nn.parallel import DistributedDataParallel

    from fastpref.integrations.hf import fastpref_compute_loss

    model, batches = _model_and_batches()
    want_loss, want = _single_process_grads(copy.deepcopy(model), batches)
    wrapped = DistributedDataParallel(model)
    out = fastpref_compute_loss(wrapped, batches[rank], "dpo", backend="torch", beta=0.5)
    out.loss.backward()
    for name, param in model.named_parameters():
        assert_max_diff(param.grad, want[name], 1e-6, f"grad {name}")


def _metrics_that_differ_across_ranks(rank):
    """PRO logs rank_k_loss per stage its lists have: ranks with other list sizes had other names, and the
    metric gather (one fixed-size collective) aborted the run."""
    from fastpref.integrations._core import gather_metrics

    def gather(t):
        out = [torch.empty_like(t) for _ in range(WORLD)]
        dist.all_gather(out, t)
        return torch.cat(out)

    mine = {"loss": 1.0, "rank_1_loss": 2.0} if rank == 0 else {"loss": 3.0, "rank_1_loss": 4.0, "rank_2_loss": 6.0}
    got = gather_metrics({k: torch.tensor(v) for k, v in mine.items()}, {}, gather)
    assert got == {"loss": 2.0, "rank_1_loss": 3.0, "rank_2_loss": 6.0}, got


def _sharded(rank):
    _fsdp2(rank, separate_head=False)
    _fsdp2(rank, separate_head=True)
    _ddp(rank)
    _metrics_that_differ_across_ranks(rank)


def test_fsdp2_and_ddp_match_single_process():
    """FSDP2 with the head in the root unit and as its own DTensor unit, and DDP: loss and every gradient;
    the trainers' metric gather when ranks log different names."""
    spawn(_sharded, world=WORLD)
