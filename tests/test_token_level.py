"""TDPO1/TDPO2 (docs/losses.md, ``tdpo1``/``tdpo2``) and per-token weights on the log-ratio and KL sums (SparsePO)."""

from __future__ import annotations

import pytest
import torch

import fastpref
from oracle import assert_close, leaves, logsigmoid, make_batch, pack, sequence_oracle


def _inputs(seed=0, b=4):
    g = torch.Generator().manual_seed(seed)
    logps = [(torch.randn(b, generator=g, dtype=torch.float64) * 3 - 20).requires_grad_() for _ in range(4)]
    kls = [(torch.rand(b, generator=g, dtype=torch.float64) * 4).requires_grad_() for _ in range(2)]
    return logps, kls


@pytest.mark.parametrize("tdpo2", [False, True])
def test_tdpo_hand_computed(tdpo2):
    (pc, pr, rc, rr), (kc, kr) = _inputs()
    beta, alpha = 0.3, 0.7
    weight = {"alpha": alpha} if tdpo2 else {}  # TDPO1 refuses a changed alpha (it has none)
    loss, cr, rj = fastpref.tdpo_loss(pc, pr, rc, rr, kc, kr, beta=beta, tdpo2=tdpo2, reduction="none", **weight)
    for i in range(4):
        margin = (pc[i] - rc[i]).item() - (pr[i] - rr[i]).item()
        delta = kr[i].item() - kc[i].item()
        logits = margin - (alpha * delta if tdpo2 else delta)
        assert_close(loss[i], -logsigmoid(beta * logits))
        assert_close(cr[i], beta * ((pc[i] - rc[i]).item() + kc[i].item()))
        assert_close(rj[i], beta * ((pr[i] - rr[i]).item() + kr[i].item()))
    loss.sum().backward()
    # dL/dD_l = beta * sigma(-beta logits) * (alpha | 1); dL/dD_w = 0 for TDPO2 (stop-gradient) | -that for TDPO1
    u = beta * (pc - rc - pr + rr - (alpha if tdpo2 else 1.0) * (kr - kc)).detach()
    slope = beta * torch.sigmoid(-u)
    assert_close(kr.grad, (alpha if tdpo2 else 1.0) * slope)
    if tdpo2:
        assert kc.grad is None  # stop-gradient on D_w
    else:
        assert_close(kc.grad, -slope)


def test_tdpo_without_kl_is_dpo():
    (pc, pr, rc, rr), _ = _inputs(1)
    zero = torch.zeros(4, dtype=torch.float64)
    expected, _, _ = fastpref.dpo_loss(pc, pr, rc, rr, beta=0.1, reduction="none")
    for tdpo2 in (False, True):
        got, _, _ = fastpref.tdpo_loss(pc, pr, rc, rr, zero, zero, beta=0.1, tdpo2=tdpo2, reduction="none")
        assert_close(got, expected, rtol=1e-12, atol=1e-12)


def _tdpo_from_oracle(o, pairs, *, beta, alpha, tdpo2, weighted=False):
    """TDPO built here from the oracle's per-row sums (not through fastpref.tdpo_loss)."""
    s = o["weighted_sum_logp"] if weighted else o["sum_logp"]
    r = o["ref_weighted_sum_logp"] if weighted else o["ref_sum_logp"]
    d = o["weighted_sum_kl"] if "weighted_sum_kl" in o else o["sum_kl"]
    rho = s - r
    dw, dl = d[:pairs], d[pairs:]
    kl_term = alpha * (dl - dw.detach()) if tdpo2 else dl - dw
    logits = rho[:pairs] - rho[pairs:] - kl_term
    return -torch.nn.functional.logsigmoid(beta * logits).mean(), dw, dl, rho


@pytest.mark.parametrize("loss", ["tdpo1", "tdpo2"])
@pytest.mark.parametrize("packed", [False, True])
def test_tdpo_front_door_matches_oracle_values_and_gradients(loss, packed):
    hidden, weight, labels, ref_hidden = make_batch(6, seed=4)
    beta, alpha = 0.4, 0.6
    hparams = dict(beta=beta, alpha=alpha) if loss == "tdpo2" else dict(beta=beta)  # TDPO1 has no alpha
    if packed:
        h, y, r, cu = pack(hidden, labels, ref_hidden)
        out = fastpref.preference_loss(h, weight, y, loss=loss, ref_hidden=r, cu_seqlens=cu, backend="torch", **hparams)
    else:
        out = fastpref.preference_loss(hidden, weight, labels, loss=loss, ref_hidden=ref_hidden, backend="torch",
                                       **hparams)
    h64, w64 = leaves(hidden, weight)
    o = sequence_oracle(h64, w64, labels, ref_hidden, kl=True)
    expected, dw, dl, rho = _tdpo_from_oracle(o, 3, beta=beta, alpha=alpha, tdpo2=loss == "tdpo2")
    assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    expected.backward()
    assert_close(hidden.grad, h64.grad, rtol=1e-4, atol=1e-6)
    assert_close(weight.grad, w64.grad, rtol=1e-4, atol=1e-6)
    # TDPO's metrics: rewards include the KL, kl/* are the sequential KLs
    m = out.metrics
    assert_close(m["kl/chosen"], dw.mean(), rtol=1e-5)
    assert_close(m["kl/rejected"], dl.mean(), rtol=1e-5)
    assert_close(m["kl/margin"], (dw - dl).mean(), rtol=1e-5, atol=1e-6)
    assert_close(m["rewards/chosen"], (beta * (rho[:3] + dw)).mean(), rtol=1e-5)
    assert_close(m["rewards/rejected"], (beta * (rho[3:] + dl)).mean(), rtol=1e-5)
    assert_close(m["logps/chosen"], o["sum_logp"][:3].mean(), rtol=1e-5)


def test_tdpo_reference_head_gets_no_gradient():
    hidden, weight, labels, ref_hidden = make_batch(4, seed=5)
    ref_hidden.requires_grad_()
    ref_weight = weight.detach().clone().requires_grad_()
    out = fastpref.preference_loss(hidden, weight, labels, loss="tdpo1", ref_hidden=ref_hidden, ref_weight=ref_weight,
                                   backend="torch")
    out.loss.backward()
    assert ref_hidden.grad is None and ref_weight.grad is None
    assert hidden.grad is not None and weight.grad.abs().sum() > 0


def test_reduce_tokens_weighted_sums():
    hidden, weight, labels, ref_hidden = make_batch(4, seed=6)
    g = torch.Generator().manual_seed(0)
    mu = torch.rand(labels.shape, generator=g, dtype=torch.float32).requires_grad_()
    md = torch.rand(labels.shape, generator=g, dtype=torch.float32).requires_grad_()
    stats = fastpref.sequence_logps(hidden, weight, labels, ref_hidden=ref_hidden, kl=True, logp_weights=mu,
                                    kl_weights=md, backend="torch")
    o = sequence_oracle(*leaves(hidden, weight), labels, ref_hidden, kl=True, logp_weights=mu, kl_weights=md)
    for key in ("weighted_sum_logp", "ref_weighted_sum_logp", "weighted_sum_kl"):
        assert_close(getattr(stats, key), o[key], rtol=1e-5, atol=1e-5)
    assert_close(stats.sum_logp, o["sum_logp"], rtol=1e-5)  # the unweighted sums are unchanged
    tok = fastpref.token_stats(hidden, weight, labels, ref_hidden=ref_hidden, kl=True, backend="torch")
    again = fastpref.reduce_tokens(tok, labels, logp_weights=mu, kl_weights=md)
    assert_close(again.weighted_sum_kl, stats.weighted_sum_kl, rtol=1e-6)
    ones = fastpref.reduce_tokens(tok, labels, logp_weights=torch.ones(labels.shape))
    assert_close(ones.weighted_sum_logp, ones.sum_logp, rtol=1e-6)
    ((stats.weighted_sum_logp - stats.ref_weighted_sum_logp).sum() + stats.weighted_sum_kl.sum()).backward()
    valid = labels != -100
    assert_close(mu.grad, (tok.logp - tok.ref_logp).detach() * valid, rtol=1e-5, atol=1e-6)  # d/dmu = logp - ref
    assert_close(md.grad, tok.kl.detach(), rtol=1e-5, atol=1e-6)


def test_sparsepo_weights_through_the_front_door_match_oracle():
    """TDPO1 with per-token masks on both sums is SparsePO's loss; gradients reach hidden, weight and masks."""
    hidden, weight, labels, ref_hidden = make_batch(4, seed=7)
    g = torch.Generator().manual_seed(1)
    mu = torch.rand(labels.shape, generator=g).requires_grad_()
    md = torch.rand(labels.shape, generator=g).requires_grad_()
    out = fastpref.preference_loss(hidden, weight, labels, loss="tdpo1", ref_hidden=ref_hidden, logp_weights=mu,
                                   kl_weights=md, beta=0.8, backend="torch")
    h64, w64, mu64, md64 = leaves(hidden, weight, mu, md)
    o = sequence_oracle(h64, w64, labels, ref_hidden, kl=True, logp_weights=mu64, kl_weights=md64)
    expected, *_ = _tdpo_from_oracle(o, 2, beta=0.8, alpha=None, tdpo2=False, weighted=True)
    assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    expected.backward()
    for got, want in ((hidden, h64), (weight, w64), (mu, mu64), (md, md64)):
        assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6)
    # unit weights give plain TDPO1
    plain = fastpref.preference_loss(hidden, weight, labels, loss="tdpo1", ref_hidden=ref_hidden, beta=0.8,
                                     backend="torch")
    ones = fastpref.preference_loss(hidden, weight, labels, loss="tdpo1", ref_hidden=ref_hidden, beta=0.8,
                                    logp_weights=torch.ones(labels.shape), kl_weights=torch.ones(labels.shape),
                                    backend="torch")
    assert_close(ones.loss, plain.loss, rtol=1e-6)


def test_token_level_errors_name_the_argument():
    hidden, weight, labels, ref_hidden = make_batch(4, seed=8)
    with pytest.raises(ValueError, match="`ref_hidden`"):
        fastpref.preference_loss(hidden, weight, labels, loss="tdpo2", ref_chosen_logps=torch.zeros(2),
                                 ref_rejected_logps=torch.zeros(2), backend="torch")
    with pytest.raises(ValueError, match="`logp_weights`"):
        fastpref.preference_loss(hidden, weight, labels, loss="dpo", ref_hidden=ref_hidden,
                                 logp_weights=torch.ones(labels.shape), backend="torch")
    with pytest.raises(ValueError, match="`kl_weights`"):
        fastpref.preference_loss(hidden, weight, labels, loss="tdpo1", ref_hidden=ref_hidden,
                                 kl_weights=torch.ones(4, 3), backend="torch")
    with pytest.raises(ValueError, match="`logp_weights`"):
        fastpref.preference_loss(hidden, weight, labels, loss="tdpo1", ref_hidden=ref_hidden,
                                 logp_weights=torch.ones(labels.shape), ref_chosen_logps=torch.zeros(2),
                                 ref_rejected_logps=torch.zeros(2), backend="torch")
    with pytest.raises(ValueError, match="`kl_weights`"):
        fastpref.sequence_logps(hidden, weight, labels, kl_weights=torch.ones(labels.shape), backend="torch")
    (pc, pr, rc, rr), (kc, _) = _inputs()
    with pytest.raises(ValueError, match="`rejected_kl`"):
        fastpref.tdpo_loss(pc, pr, rc, rr, kc, kc[:2])
