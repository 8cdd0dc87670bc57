"""KTO with its mismatched-row KL estimate (docs/losses.md, ``kto``) and WPO weighting (TRL ``use_weighting``)."""

from __future__ import annotations

import math

import pytest
import torch

import fastpref
from oracle import assert_close, leaves, make_batch, pack, sequence_oracle


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_hand_computed(loss_type):
    policy = torch.tensor([-12.0, -8.5, -20.0, -3.0, -9.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-11.0, -9.5, -18.0, -4.0, -9.5], dtype=torch.float64)
    desirable = torch.tensor([True, False, True, False, True])
    z, beta, wd, wu = 0.7, 0.2, 1.3, 0.6
    kl = z if loss_type == "kto" else None  # apo_zero_unpaired has no reference point
    loss, rewards = fastpref.kto_loss(policy, ref, desirable, kl=kl, beta=beta, desirable_weight=wd,
                                      undesirable_weight=wu, loss_type=loss_type, reduction="none")
    for i in range(5):
        rho = policy[i].item() - ref[i].item()
        if loss_type == "kto":
            expected = wd * (1 - _sigmoid(beta * (rho - z))) if desirable[i] else wu * (1 - _sigmoid(beta * (z - rho)))
        else:
            expected = wd * (1 - _sigmoid(beta * rho)) if desirable[i] else wu * _sigmoid(beta * rho)
        assert_close(loss[i], expected, rtol=1e-12)
        assert_close(rewards[i], beta * rho, rtol=1e-12)
    mean, _ = fastpref.kto_loss(policy, ref, desirable, kl=kl, beta=beta, desirable_weight=wd, undesirable_weight=wu,
                                loss_type=loss_type)
    assert_close(mean, loss.mean(), rtol=1e-12)


def test_kto_kl_estimate_is_a_clamped_detached_mean():
    policy = torch.tensor([-5.0, -7.0, -6.0], requires_grad=True)
    assert_close(fastpref.kto_kl_estimate(policy, torch.tensor([-6.0, -6.5, -6.0])), (1.0 - 0.5 + 0.0) / 3)
    z = fastpref.kto_kl_estimate(policy, torch.tensor([-4.0, -6.0, -5.0]))
    assert z.item() == 0.0 and not z.requires_grad


@pytest.mark.parametrize("packed", [False, True])
def test_kto_front_door_with_kl_rows_matches_oracle(packed):
    """Rows: 4 examples then 3 mismatched KL rows; the KL rows give z and get no gradient."""
    hidden, weight, labels, ref_hidden = make_batch(7, seed=9)
    desirable = torch.tensor([True, False, True, False])
    beta = 0.5
    kwargs = dict(loss="kto", desirable=desirable, num_kl_rows=3, beta=beta, backend="torch", trl_metrics=True)
    if packed:
        h, y, r, cu = pack(hidden, labels, ref_hidden)
        out = fastpref.preference_loss(h, weight, y, ref_hidden=r, cu_seqlens=cu, **kwargs)
    else:
        out = fastpref.preference_loss(hidden, weight, labels, ref_hidden=ref_hidden, **kwargs)
    h64, w64 = leaves(hidden, weight)
    o = sequence_oracle(h64, w64, labels, ref_hidden)
    rho = o["sum_logp"] - o["ref_sum_logp"]
    z = rho[4:].detach().mean().clamp(min=0)
    d = desirable.double()
    per = d * (1 - torch.sigmoid(beta * (rho[:4] - z))) + (1 - d) * (1 - torch.sigmoid(beta * (z - rho[:4])))
    expected = per.mean()
    assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert_close(out.metrics["kl"], z, rtol=1e-5, atol=1e-6)
    assert_close(out.metrics["rewards/chosen"], beta * rho[:4][desirable].mean(), rtol=1e-5)
    assert_close(out.metrics["rewards/rejected"], beta * rho[:4][~desirable].mean(), rtol=1e-5)
    assert_close(out.metrics["logps/chosen"], o["sum_logp"][:4][desirable].mean(), rtol=1e-5)
    assert "rewards/accuracies" not in out.metrics  # TRL's KTO logs none
    out.loss.backward()
    expected.backward()
    assert_close(weight.grad, w64.grad, rtol=1e-4, atol=1e-6)
    assert_close(hidden.grad, h64.grad, rtol=1e-4, atol=1e-6)
    if not packed:
        assert hidden.grad[4:].abs().max() == 0


def test_kto_metrics_skip_an_absent_side_and_precomputed_z():
    hidden, weight, labels, ref_hidden = make_batch(3, seed=10)
    out = fastpref.preference_loss(hidden, weight, labels, loss="kto", ref_hidden=ref_hidden, kl=0.25,
                                   desirable=torch.ones(3, dtype=torch.bool), backend="torch")
    assert "rewards/rejected" not in out.metrics and "rewards/margins" not in out.metrics
    assert_close(out.metrics["kl"], 0.25)
    o = sequence_oracle(*leaves(hidden, weight), labels, ref_hidden)
    rho = o["sum_logp"] - o["ref_sum_logp"]
    assert_close(out.loss, (1 - torch.sigmoid(0.1 * (rho - 0.25))).mean(), rtol=1e-5)
    precomputed = fastpref.preference_loss(hidden, weight, labels, loss="kto", ref_logps=o["ref_sum_logp"].float(),
                                           kl=0.25, desirable=torch.tensor([1, 1, 1]), backend="torch")
    assert_close(precomputed.loss, out.loss, rtol=1e-6)


@pytest.mark.parametrize("kwargs, arg", [
    (dict(num_kl_rows=2), "desirable"),                                            # missing
    (dict(desirable=torch.tensor([True, False, True]), num_kl_rows=2), "desirable"),  # 3 + 2 != 4
    (dict(desirable=torch.tensor([True, False, True, False])), "num_kl_rows"),     # no KL rows and no z
    (dict(desirable=torch.tensor([2, 0, 1, 1])), "desirable"),
    (dict(desirable=torch.tensor([True, False]), num_kl_rows=-2), "num_kl_rows"),
    (dict(desirable=torch.tensor([True, False]), num_kl_rows=2, group_sizes=[2, 2]), "group_sizes"),
])
def test_unpaired_errors_name_the_argument(kwargs, arg):
    hidden, weight, labels, ref_hidden = make_batch(4, seed=11)
    with pytest.raises(ValueError, match=f"`{arg}`"):
        fastpref.preference_loss(hidden, weight, labels, loss="kto", ref_hidden=ref_hidden, backend="torch", **kwargs)


def test_pair_loss_rejects_unpaired_arguments():
    hidden, weight, labels, ref_hidden = make_batch(4, seed=11)
    with pytest.raises(ValueError, match="`desirable`"):
        fastpref.preference_loss(hidden, weight, labels, loss="dpo", ref_hidden=ref_hidden, backend="torch",
                                 desirable=torch.ones(4, dtype=torch.bool))


# ---------------------------------------------------------------- WPO


def test_wpo_weights_hand_computed():
    """w(y) = exp(mean_t [logp_t - log sum_v p_t(v)^2]) with explicit loops over a tiny vocabulary."""
    hidden, weight, labels, _ = make_batch(2, seed=12, vocab=6, dim=4)
    stats = fastpref.sequence_logps(hidden, weight, labels, log_sum_sq_probs=True, backend="torch")
    w = fastpref.wpo_weights(stats.mean_logp, stats.mean_log_sum_sq_probs)
    for row in range(2):
        terms = []
        for t in range(labels.shape[1]):
            if labels[row, t] == -100:
                continue
            z = [sum(hidden[row, t, k].item() * weight[v, k].item() for k in range(4)) for v in range(6)]
            lse = math.log(sum(math.exp(x) for x in z))
            p = [math.exp(x - lse) for x in z]
            terms.append((z[labels[row, t]] - lse) - math.log(sum(q * q for q in p)))
        assert_close(w[row], math.exp(sum(terms) / len(terms)), rtol=1e-5)
    assert not w.requires_grad


@pytest.mark.parametrize("loss, hparams", [("dpo", {"beta": 0.3}), ("dpo", {"loss_type": ["sigmoid", "hinge"]}),
                                           ("simpo", {}), ("tdpo2", {})])
def test_use_weighting_through_the_front_door(loss, hparams):
    hidden, weight, labels, ref_hidden = make_batch(6, seed=13)
    ref_hidden = None if loss == "simpo" else ref_hidden  # SimPO uses no reference
    plain = fastpref.preference_loss(hidden, weight, labels, loss=loss, ref_hidden=ref_hidden, backend="torch",
                                     reduction="none", **hparams)
    out = fastpref.preference_loss(hidden, weight, labels, loss=loss, ref_hidden=ref_hidden, backend="torch",
                                   reduction="none", use_weighting=True, **hparams)
    o = sequence_oracle(*leaves(hidden, weight), labels, log_sum_sq_probs=True)
    w = torch.exp(o["mean_logp"] - o["mean_log_sum_sq_probs"]).detach()
    assert_close(out.loss, plain.loss * w[:3] * w[3:], rtol=1e-5, atol=1e-7)
    # the weights carry no gradient: d(weighted)/d(theta) = w_w w_l d(plain)/d(theta)
    g_out = torch.autograd.grad(out.loss.sum(), weight)[0]
    g_plain = torch.autograd.grad((plain.loss * (w[:3] * w[3:]).float()).sum(), weight)[0]
    assert_close(g_out, g_plain, rtol=1e-4, atol=1e-7)


def test_use_weighting_errors():
    hidden, weight, labels, ref_hidden = make_batch(4, seed=14)
    with pytest.raises(ValueError, match="`use_weighting`"):
        fastpref.preference_loss(hidden, weight, labels, loss="dpo", ref_hidden=ref_hidden, backend="torch",
                                 use_weighting=True, loss_type="aot")
    with pytest.raises(ValueError, match="`use_weighting`"):
        fastpref.preference_loss(hidden, weight, labels, loss="kto", ref_hidden=ref_hidden, backend="torch",
                                 use_weighting=True, desirable=torch.ones(4, dtype=torch.bool), kl=0.0)
