"""Levels 2-3 through the fused front door vs the fp64 oracle followed by the functional losses."""

import pytest
import torch

import fastpref
from oracle import make_head, make_labels, rel_err, token_oracle

BACKEND = "torch"
B, T, D, V = 3, 10, 32, 257


@pytest.fixture(scope="module")
def batch():
    head = make_head(2 * B, T, D, V, ref=True, bias=True, seed=5)
    labels = make_labels(2 * B, T, V, prompt=3, pad=[0, 2, 1, 4, 0, 3], seed=5)
    return head, labels


def oracle_sequences(head, labels, **options):
    """fp64 per-sequence sums from the materialising oracle; leaves for gradients."""
    stats, h64 = token_oracle(head, labels, **options)
    n = (labels != -100).sum(-1).double()
    seq = {k: getattr(stats, k).sum(-1) for k in ("logp", "entropy", "ref_logp", "ref_entropy", "kl")
           if getattr(stats, k) is not None}
    return seq, n, h64


def halves(x):
    return x[:B], x[B:]


def fused(head, labels, loss, **kw):
    h = head["hidden"].clone().requires_grad_(True)
    w = head["weight"].clone().requires_grad_(True)
    out = fastpref.preference_loss(h, w, labels, loss=loss, bias=head["bias"], backend=BACKEND, **kw)
    gh, gw = torch.autograd.grad(out.loss, [h, w])
    return out, gh, gw


def check(out, gh, gw, want, h64):
    gh64, gw64 = torch.autograd.grad(want, [h64["hidden"], h64["weight"]])
    assert abs(out.loss.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    assert rel_err(gh, gh64) < 1e-4 and rel_err(gw, gw64) < 1e-4


REF_HEAD = "ref_head"
PRECOMPUTED = "precomputed"


@pytest.mark.parametrize("source", [REF_HEAD, PRECOMPUTED])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "aot"])
def test_dpo_matches_oracle(batch, source, loss_type):
    head, labels = batch
    seq, n, h64 = oracle_sequences(head, labels)
    ref_head = dict(ref_hidden=head["ref_hidden"], ref_weight=head["ref_weight"])
    with torch.no_grad():
        ref_seq, _, _ = oracle_sequences({"hidden": head["ref_hidden"], "weight": head["ref_weight"]}, labels)
    rc, rr = halves(ref_seq["logp"])
    kw = ref_head if source == REF_HEAD else dict(ref_chosen_logps=rc.float(), ref_rejected_logps=rr.float())
    out, gh, gw = fused(head, labels, "dpo", loss_type=loss_type, beta=0.2, **kw)
    pc, pr = halves(seq["logp"])
    nw, nl = halves(n)
    want, cr, rrw = fastpref.dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=loss_type, chosen_num_tokens=nw,
                                      rejected_num_tokens=nl)
    check(out, gh, gw, want, h64)
    assert abs(out.metrics["rewards/chosen"].item() - cr.mean().item()) < 1e-4
    assert abs(out.metrics["rewards/margins"].item() - (cr - rrw).mean().item()) < 1e-4
    assert abs(out.metrics["logps/chosen"].item() - pc.mean().item()) < 1e-3


@pytest.mark.parametrize("loss,kw,mean", [
    ("simpo", dict(beta=2.0, gamma_beta_ratio=0.5), True),
    ("cpo", dict(beta=0.1), False),
    ("cpo", dict(beta=0.1, loss_type="simpo"), True),
    ("orpo", dict(beta=0.1), True),
])
def test_reference_free_losses_match_oracle(batch, loss, kw, mean):
    head, labels = batch
    seq, n, h64 = oracle_sequences(head, labels)
    out, gh, gw = fused(head, labels, loss, **kw)
    pc, pr = halves(seq["logp"])
    nw, nl = halves(n)
    nll = -pc.sum() / nw.sum()
    if mean:
        pc, pr = pc / nw, pr / nl
    fn = {"simpo": fastpref.simpo_loss, "cpo": fastpref.cpo_loss, "orpo": fastpref.orpo_loss}[loss]
    extra = {} if loss == "simpo" else {"policy_nll_loss": nll}
    want, _, _ = fn(pc, pr, **kw, **extra)
    check(out, gh, gw, want, h64)
    if loss != "simpo":
        assert abs(out.metrics["nll_loss"].item() - nll.item()) < 1e-5


@pytest.mark.parametrize("loss", ["dpop", "mmpo", "todo"])
def test_reference_losses_match_oracle(batch, loss):
    head, labels = batch
    seq, n, h64 = oracle_sequences(head, labels, ref_hidden=head["ref_hidden"], ref_weight=head["ref_weight"])
    kw = {"todo": dict(ties=torch.tensor([0, 1, 0])), "mmpo": dict(soft_labels=torch.tensor([0.9, 0.5, 0.7])),
          "dpop": dict(beta=0.3)}[loss]
    out, gh, gw = fused(head, labels, loss, ref_hidden=head["ref_hidden"], ref_weight=head["ref_weight"], **kw)
    fn = {"dpop": fastpref.dpop_loss, "mmpo": fastpref.mmpo_loss, "todo": fastpref.todo_loss}[loss]
    want, _, _ = fn(*halves(seq["logp"]), *halves(seq["ref_logp"]), **{k: v.double() if v.is_floating_point() else v
                                                                       for k, v in kw.items() if torch.is_tensor(v)},
                    **{k: v for k, v in kw.items() if not torch.is_tensor(v)})
    check(out, gh, gw, want, h64)


@pytest.mark.parametrize("loss", ["mallows_dpo", "mallows_ipo", "mallows_phi_dpo"])
@pytest.mark.parametrize("reference_free", [True, False])
def test_mallows_with_online_reference_entropy(batch, loss, reference_free):
    head, labels = batch
    ref = dict(ref_hidden=head["ref_hidden"], ref_weight=head["ref_weight"])
    seq, n, h64 = oracle_sequences(head, labels, ref_entropy=True, **ref)
    out, gh, gw = fused(head, labels, loss, reference_free=reference_free, **ref)
    nw, nl = halves(n)
    hw, hl = halves(seq["ref_entropy"])
    psi = fastpref.neg_log_dispersion(hw / nw, hl / nl, vocab_size=V)
    pc, pr = halves(seq["logp"])
    rc, rr = halves(seq["ref_logp"])
    refs = (None, None) if reference_free else (rc / nw, rr / nl)
    fn = {"mallows_dpo": fastpref.mallows_dpo_loss, "mallows_ipo": fastpref.mallows_ipo_loss,
          "mallows_phi_dpo": fastpref.mallows_phi_dpo_loss}[loss]
    want, _, _ = fn(pc / nw, pr / nl, *refs, neg_log_dispersion=psi.double())
    check(out, gh, gw, want, h64)
    assert abs(out.metrics["neg_log_dispersion"].item() - psi.mean().item()) < 1e-5


def test_mallows_entropy_sources(batch):
    """Precomputed summed reference entropies == the online reference head; no reference -> policy entropy."""
    head, labels = batch
    ref = dict(ref_hidden=head["ref_hidden"], ref_weight=head["ref_weight"])
    online = fastpref.preference_loss(**{k: head[k] for k in ("hidden", "weight", "bias")}, labels=labels,
                                      loss="mallows_dpo", backend=BACKEND, **ref)
    seq = fastpref.sequence_logps(head["ref_hidden"], head["ref_weight"], labels, bias=head["bias"], entropy=True,
                                  backend=BACKEND)
    pre = fastpref.preference_loss(**{k: head[k] for k in ("hidden", "weight", "bias")}, labels=labels,
                                   loss="mallows_dpo", ref_chosen_entropy=seq.sum_entropy[:B],
                                   ref_rejected_entropy=seq.sum_entropy[B:], backend=BACKEND)
    # the oracle reference head has no bias; give the online path the same bias-free reference
    seq_nobias = fastpref.sequence_logps(head["ref_hidden"], head["ref_weight"], labels, entropy=True, backend=BACKEND)
    pre_nobias = fastpref.preference_loss(**{k: head[k] for k in ("hidden", "weight", "bias")}, labels=labels,
                                          loss="mallows_dpo", ref_chosen_entropy=seq_nobias.sum_entropy[:B],
                                          ref_rejected_entropy=seq_nobias.sum_entropy[B:], backend=BACKEND)
    assert torch.allclose(online.loss, pre_nobias.loss, rtol=1e-6)
    assert not torch.allclose(pre.loss, pre_nobias.loss)  # the entropies really are used
    policy = fastpref.preference_loss(**{k: head[k] for k in ("hidden", "weight", "bias")}, labels=labels,
                                      loss="mallows_dpo", backend=BACKEND)
    own = fastpref.sequence_logps(head["hidden"], head["weight"], labels, bias=head["bias"], entropy=True,
                                  backend=BACKEND)
    fallback = fastpref.preference_loss(**{k: head[k] for k in ("hidden", "weight", "bias")}, labels=labels,
                                        loss="mallows_dpo", ref_chosen_entropy=own.sum_entropy[:B],
                                        ref_rejected_entropy=own.sum_entropy[B:], backend=BACKEND)
    assert torch.allclose(policy.loss, fallback.loss, rtol=1e-6)


def test_packed_sequences_match_padded(batch):
    head, labels = batch
    valid_rows = [(labels[r] != -100).nonzero().max().item() + 1 for r in range(2 * B)]  # drop right padding
    hidden = torch.cat([head["hidden"][r, : valid_rows[r]] for r in range(2 * B)])[None]
    packed_labels = torch.cat([labels[r, : valid_rows[r]] for r in range(2 * B)])[None]
    cu = torch.tensor([0] + valid_rows).cumsum(0)
    ref = dict(ref_hidden=head["ref_hidden"], ref_weight=head["ref_weight"])
    ref_packed = dict(ref_hidden=torch.cat([head["ref_hidden"][r, : valid_rows[r]] for r in range(2 * B)])[None],
                      ref_weight=head["ref_weight"])
    for loss in ("dpo", "mallows_dpo"):
        padded = fastpref.preference_loss(head["hidden"], head["weight"], labels, loss=loss, backend=BACKEND, **ref)
        packed = fastpref.preference_loss(hidden, head["weight"], packed_labels, cu_seqlens=cu, loss=loss,
                                          backend=BACKEND, **ref_packed)
        assert torch.allclose(padded.loss, packed.loss, rtol=1e-6)
        for k in padded.metrics:
            assert torch.allclose(padded.metrics[k], packed.metrics[k], rtol=1e-5, atol=1e-6), k
    seq_ids = torch.repeat_interleave(torch.arange(2 * B), torch.tensor(valid_rows))[None]
    by_ids = fastpref.sequence_logps(hidden, head["weight"], packed_labels, seq_ids=seq_ids, backend=BACKEND)
    by_cu = fastpref.sequence_logps(hidden, head["weight"], packed_labels, cu_seqlens=cu, backend=BACKEND)
    padded_seq = fastpref.sequence_logps(head["hidden"], head["weight"], labels, backend=BACKEND)
    assert torch.allclose(by_ids.sum_logp, by_cu.sum_logp) and torch.allclose(by_cu.sum_logp, padded_seq.sum_logp)
    assert torch.equal(by_cu.num_tokens, padded_seq.num_tokens)


def test_sequence_logps_fields(batch):
    head, labels = batch
    seq = fastpref.sequence_logps(head["hidden"], head["weight"], labels, entropy=True, ref_hidden=head["ref_hidden"],
                                  ref_weight=head["ref_weight"], kl=True, ref_entropy=True, backend=BACKEND)
    want, n, _ = oracle_sequences(head | {"bias": None}, labels, entropy=True, ref_hidden=head["ref_hidden"],
                                  ref_weight=head["ref_weight"], kl=True, ref_entropy=True)
    assert torch.equal(seq.num_tokens, (labels != -100).sum(-1))
    pairs = [("sum_logp", "logp"), ("sum_entropy", "entropy"), ("ref_sum_logp", "ref_logp"),
             ("ref_sum_entropy", "ref_entropy"), ("sum_kl", "kl")]
    for field, key in pairs:
        assert rel_err(getattr(seq, field), want[key]) < 1e-5, field
    assert rel_err(seq.mean_logp, want["logp"] / n) < 1e-5
    assert rel_err(seq.ref_mean_entropy, want["ref_entropy"] / n) < 1e-5


def test_trl_metrics(batch):
    head, labels = batch
    out = fastpref.preference_loss(head["hidden"], head["weight"], labels, loss="dpo", ref_hidden=head["ref_hidden"],
                                   ref_weight=head["ref_weight"], trl_metrics=True, backend=BACKEND)
    stats, _ = token_oracle(head | {"bias": None}, labels, entropy=True, mean_logits=True, is_top1=True)
    mask = labels != -100
    assert abs(out.metrics["entropy"].item() - stats.entropy[mask].mean().item()) < 1e-5
    chosen = mask[:B]
    assert abs(out.metrics["logits/chosen"].item() - stats.mean_logits[:B][chosen].mean().item()) < 1e-5
    assert abs(out.metrics["logits/rejected"].item() - stats.mean_logits[B:][mask[B:]].mean().item()) < 1e-5
    assert abs(out.metrics["mean_token_accuracy"].item() - stats.is_top1[:B][chosen].float().mean().item()) < 1e-6
    expected = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"}
    assert set(out.metrics) == expected
    assert all(v.dim() == 0 and not v.requires_grad for v in out.metrics.values())


def test_module_and_reduction(batch):
    head, labels = batch
    criterion = fastpref.PreferenceLoss("simpo", beta=2.0, backend=BACKEND)
    out = criterion(head["hidden"], head["weight"], labels)
    per_pair = criterion(head["hidden"], head["weight"], labels, reduction="none")
    assert per_pair.loss.shape == (B,) and torch.allclose(per_pair.loss.mean(), out.loss)


def test_every_registered_pairwise_loss_runs(batch):
    head, labels = batch
    extra = {"todo": dict(ties=torch.tensor([1, 0, 0]))}
    for name in fastpref.available_losses():
        spec = fastpref.get_loss(name)
        if spec.layout != "pairs":
            continue
        used = spec.reference != "none" or spec.ref_entropy
        ref = dict(ref_hidden=head["ref_hidden"], ref_weight=head["ref_weight"]) if used else {}
        h = head["hidden"].clone().requires_grad_(True)
        out = fastpref.preference_loss(h, head["weight"], labels, loss=name, backend=BACKEND, **ref,
                                       **extra.get(name, {}))
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0, name
