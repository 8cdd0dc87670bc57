"""Nothing silently wrong at levels 2-3: every wrong value is a ValueError naming the argument.

Each case here used to be accepted (and trained something else than asked) or to fail obscurely.
"""

from __future__ import annotations

import re

import pytest
import torch

import fastpref
from oracle import make_batch

A, B = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])
RA, RB = torch.tensor([-3.5, -5.5]), torch.tensor([-4.2, -4.0])
NAN = float("nan")


def raises(arg, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=re.escape(f"`{arg}`")):
        fn(*args, **kwargs)


@pytest.mark.parametrize("beta", [torch.tensor(-0.1), torch.tensor([0.1, NAN]), "0.1", NAN, True, 0.0])
def test_beta(beta):
    raises("beta", fastpref.dpo_loss, A, B, RA, RB, beta=beta)
    raises("beta", fastpref.simpo_loss, A, B, beta=beta)


def test_tensor_beta_per_pair_is_honoured():
    per_pair, _, _ = fastpref.dpo_loss(A, B, RA, RB, beta=torch.tensor([0.1, 0.3]), reduction="none")
    first, _, _ = fastpref.dpo_loss(A[:1], B[:1], RA[:1], RB[:1], beta=0.1, reduction="none")
    assert torch.allclose(per_pair[:1], first)


def test_dpo_options():
    raises("loss_type", fastpref.dpo_loss, A, B, RA, RB, loss_type=[])
    raises("loss_type", fastpref.dpo_loss, A, B, RA, RB, loss_type=["sigmoid", 3])
    raises("loss_weights", fastpref.dpo_loss, A, B, RA, RB, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, NAN])
    raises("loss_weights", fastpref.dpo_loss, A, B, RA, RB, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, -1.0])
    raises("label_smoothing", fastpref.dpo_loss, A, B, RA, RB, label_smoothing=NAN)
    raises("discopop_tau", fastpref.dpo_loss, A, B, RA, RB, loss_type="discopop", discopop_tau=0.0)
    raises("chosen_num_tokens", fastpref.dpo_loss, A, B, RA, RB, loss_type="ipo",
           chosen_num_tokens=torch.tensor([3, 4, 5]), rejected_num_tokens=torch.tensor([3, 4]))
    raises("chosen_num_tokens", fastpref.dpo_loss, A, B, RA, RB, loss_type="ipo",
           chosen_num_tokens=torch.tensor([[3, 4]]), rejected_num_tokens=torch.tensor([3, 4]))
    raises("label_smoothing", fastpref.dpo_loss, A, B, RA, RB, loss_type="hinge", label_smoothing=0.1)  # unused
    smoothed, _, _ = fastpref.dpo_loss(A, B, RA, RB, loss_type=["hinge", "sigmoid"], label_smoothing=0.1)
    assert torch.isfinite(smoothed)
    raises("label_smoothing", fastpref.simpo_loss, A, B, loss_type="hinge", label_smoothing=0.1)
    raises("label_smoothing", fastpref.cpo_loss, A, B, loss_type="ipo", label_smoothing=0.1, cpo_alpha=0.0)
    raises("dpop_lambda", fastpref.dpop_loss, A, B, RA, RB, dpop_lambda=-1.0)
    raises("tie_alpha", fastpref.todo_loss, A, B, RA, RB, ties=torch.tensor([0, 1]), tie_alpha=NAN)
    raises("ties", fastpref.todo_loss, A, B, RA, RB, ties=torch.tensor([0.5, 1.0]))
    raises("soft_labels", fastpref.mmpo_loss, A, B, RA, RB, soft_labels=torch.tensor([1.5, 0.5]))
    raises("bt_beta", fastpref.mmpo_loss, A, B, RA, RB, bt_beta=2.0)  # no scores to scale


def test_settings_of_another_variant_are_refused_when_changed():
    """A setting that acts in one variant only: its default passes anywhere, a changed value only where it acts."""
    KA, KB = torch.tensor([0.2, 0.1]), torch.tensor([0.3, 0.4])
    cases = [  # (argument, changed value, call where it would be ignored, call where it acts)
        ("discopop_tau", 0.1, lambda **kw: fastpref.dpo_loss(A, B, RA, RB, **kw),
         lambda **kw: fastpref.dpo_loss(A, B, RA, RB, loss_type=["sigmoid", "discopop"], **kw)),
        ("f_alpha_divergence_coef", 0.3, lambda **kw: fastpref.dpo_loss(A, B, RA, RB, f_divergence_type="js_divergence", **kw),
         lambda **kw: fastpref.dpo_loss(A, B, RA, RB, f_divergence_type="alpha_divergence", **kw)),
        ("simpo_gamma", 1.0, lambda **kw: fastpref.cpo_loss(A / 4, B / 4, cpo_alpha=0.0, **kw),
         lambda **kw: fastpref.cpo_loss(A / 4, B / 4, cpo_alpha=0.0, loss_type="simpo", **kw)),
        ("sft_coef", 1.0, lambda **kw: fastpref.mallows_dpo_loss(A, B, neg_log_dispersion=1.0, **kw),
         lambda **kw: fastpref.mallows_dpo_loss(A, B, neg_log_dispersion=1.0, add_sft_loss=True, **kw)),
        ("s0", 0.5, lambda **kw: fastpref.mallows_phi_dpo_loss(A, B, neg_log_dispersion=1.0, beta=0.1, link="sigmoid", **kw),
         lambda **kw: fastpref.mallows_phi_dpo_loss(A, B, neg_log_dispersion=1.0, beta=0.1, **kw)),
        ("alpha", 0.2, lambda **kw: fastpref.tdpo_loss(A, B, RA, RB, KA, KB, tdpo2=False, **kw),
         lambda **kw: fastpref.tdpo_loss(A, B, RA, RB, KA, KB, **kw)),
    ]
    for arg, value, ignored, acting in cases:
        raises(arg, ignored, **{arg: value})
        assert torch.isfinite(ignored()[0])  # the default is accepted where it does not act
        default = acting()[0]
        assert not torch.allclose(acting(**{arg: value})[0], default), arg  # and the value acts where accepted


def test_nll_terms_are_required_or_explicitly_off():
    nll = torch.tensor(2.0)
    raises("policy_nll_loss", fastpref.simpo_loss, A, B, sft_weight=1.0)
    raises("policy_nll_loss", fastpref.cpo_loss, A, B)                 # cpo_alpha=1 by default
    raises("policy_nll_loss", fastpref.orpo_loss, A / 10, B / 10)
    raises("sft_weight", fastpref.simpo_loss, A, B, sft_weight=-0.5, policy_nll_loss=nll)
    raises("cpo_alpha", fastpref.cpo_loss, A, B, cpo_alpha=-1.0, policy_nll_loss=nll)
    raises("gamma_beta_ratio", fastpref.simpo_loss, A, B, gamma_beta_ratio=-0.25)
    off, _, _ = fastpref.cpo_loss(A, B, cpo_alpha=0.0, reduction="none")
    on, _, _ = fastpref.cpo_loss(A, B, policy_nll_loss=nll, reduction="none")
    assert torch.allclose(on - off, torch.full_like(on, 2.0))
    odds, _, _ = fastpref.orpo_loss(A / 10, B / 10, nll_weight=0.0, reduction="none")
    full, _, _ = fastpref.orpo_loss(A / 10, B / 10, policy_nll_loss=nll, reduction="none")
    assert torch.allclose(full - odds, torch.full_like(full, 2.0))


def test_kto_values():
    pol, ref = torch.tensor([-3.0, -4.0, -5.0]), torch.tensor([-3.5, -4.0, -4.5])
    for desirable in (torch.tensor([0.5, 1.0, 0.0]), torch.tensor([2, 0, 1])):
        raises("desirable", fastpref.kto_loss, pol, ref, desirable, kl=0.1)
    d = torch.tensor([True, False, True])
    raises("desirable_weight", fastpref.kto_loss, pol, ref, d, kl=0.1, desirable_weight=-1.0)
    raises("undesirable_weight", fastpref.kto_loss, pol, ref, d, kl=0.1, undesirable_weight=NAN)
    raises("kl", fastpref.kto_loss, pol, ref, d, kl=-0.5)  # z = max(0, KL) is never negative
    raises("kl", fastpref.kto_loss, pol, ref, d, kl=0.1, loss_type="apo_zero_unpaired")  # no z in that loss


def test_tdpo_values():
    kl = torch.tensor([0.5, 0.2])
    raises("alpha", fastpref.tdpo_loss, A, B, RA, RB, kl, kl, alpha=-0.5)
    raises("tdpo2", fastpref.tdpo_loss, A, B, RA, RB, kl, kl, tdpo2="no")
    one, _, _ = fastpref.losses.tdpo1_loss(A, B, RA, RB, kl, kl * 3, beta=0.2)
    assert torch.equal(one, fastpref.tdpo_loss(A, B, RA, RB, kl, kl * 3, beta=0.2, tdpo2=False)[0])
    two, _, _ = fastpref.losses.tdpo2_loss(A, B, RA, RB, kl, kl * 3, beta=0.2, alpha=0.3)
    assert torch.equal(two, fastpref.tdpo_loss(A, B, RA, RB, kl, kl * 3, beta=0.2, alpha=0.3)[0])


@pytest.mark.parametrize("fn", [fastpref.mallows_dpo_loss, fastpref.mallows_ipo_loss, fastpref.mallows_phi_dpo_loss])
@pytest.mark.parametrize("psi", [0.0, -1.0, NAN, torch.tensor([1.0, 0.0]), torch.tensor([1.0, NAN]), "1"])
def test_mallows_psi_must_be_positive(fn, psi):
    raises("neg_log_dispersion", fn, A / 10, B / 10, neg_log_dispersion=psi)


def test_mallows_values():
    raises("home_advantage", fastpref.mallows_dpo_loss, A, B, neg_log_dispersion=1.0, home_advantage=-0.1)
    raises("mixing_alpha", fastpref.mallows_dpo_loss, A, B, RA, RB, neg_log_dispersion=1.0, mixing_alpha=NAN)
    raises("add_sft_loss", fastpref.mallows_dpo_loss, A, B, neg_log_dispersion=1.0, add_sft_loss="yes")
    raises("s0", fastpref.mallows_phi_dpo_loss, A, B, neg_log_dispersion=1.0, s0=NAN)


def test_dispersion_estimates():
    vocab = 1000  # log V = 6.9
    summed = torch.tensor([40.0, 3.0]), torch.tensor([35.0, 4.0])  # summed over ~20 tokens: above log V
    with pytest.raises(ValueError, match=r"`chosen_entropy`.*look SUMMED.*paper_sum"):
        fastpref.neg_log_dispersion(*summed, vocab_size=vocab)
    with pytest.raises(ValueError, match=r"`dispersion`.*psi <= 0.*dispersion='mean'"):
        fastpref.neg_log_dispersion(*summed, vocab_size=vocab, dispersion="paper_sum")
    means = torch.tensor([2.0, 0.3]), torch.tensor([1.5, 0.4])
    for c in (0.0, -0.29, NAN):
        raises("c", fastpref.neg_log_dispersion, *means, vocab_size=vocab, c=c)
    raises("chosen_entropy", fastpref.neg_log_dispersion, torch.tensor([-0.1, 1.0]), means[1], vocab_size=vocab)
    raises("vocab_size", fastpref.neg_log_dispersion, *means, vocab_size=True)
    psi = fastpref.neg_log_dispersion(*means, vocab_size=vocab)
    assert (psi > 0).all()


def test_mppo_point_scores_are_unit_targets():
    logps = torch.tensor([[-0.5, -1.0, -2.0]])
    ratings = torch.tensor([[9.0, 6.0, 2.0]])  # raw 1-10 ratings
    for fn in (fastpref.mppo_point_ce_loss, fastpref.mppo_point_mse_loss):
        with pytest.raises(ValueError, match=r"`scores` must be in \[0, 1\].*divided by 10"):
            fn(logps, ratings)
        assert torch.isfinite(fn(logps, ratings / 10)[0])
    # other list losses rank by scores: any finite scale is fine
    assert torch.isfinite(fastpref.mppo_pair_mnm_loss(logps, ratings)[0])
    raises("negative", fastpref.mppo_pair_single_loss, logps, negative="best")
    raises("generator", fastpref.mppo_pair_single_loss, logps, negative="worst", generator=torch.Generator())
    raises("sft_weight", fastpref.pro_loss, logps, ratings, logps * 5, sft_weight=-0.05)


# ---------------------------------------------------------------- through the front door


def _front(loss, rows=4, **kwargs):
    hidden, weight, labels, ref_hidden = make_batch(rows, seed=5)
    ref = {} if fastpref.get_loss(loss).reference == "none" else {"ref_hidden": ref_hidden}
    return fastpref.preference_loss(hidden, weight, labels, loss=loss, backend="torch", **ref, **kwargs)


@pytest.mark.parametrize("loss, kwargs, arg", [
    ("dpo", dict(use_weighting="no"), "use_weighting"),
    ("dpo", dict(use_weighting=2), "use_weighting"),
    ("mallows_dpo", dict(reference_free="no"), "reference_free"),
    ("mallows_dpo", dict(length_normalization="yes"), "length_normalization"),
    ("mallows_dpo", dict(neg_log_dispersion=1.0, dispersion="paper_sum", reference_free=False), "dispersion"),
    ("mallows_dpo", dict(neg_log_dispersion=1.0, dispersion_c=0.5, reference_free=False), "dispersion_c"),
    ("mallows_dpo", dict(dispersion_c=0.0), "dispersion_c"),
    ("mallows_dpo", dict(neg_log_dispersion=torch.tensor([1.0, -1.0]), reference_free=False), "neg_log_dispersion"),
    ("kto", dict(desirable=torch.tensor([True, False]), num_kl_rows=True), "num_kl_rows"),
    ("kto", dict(desirable=torch.tensor([True, False]), num_kl_rows=2, kl=0.1), "num_kl_rows"),  # KL rows unused
    ("kto", dict(desirable=torch.tensor([True, False]), num_kl_rows=2, loss_type="apo_zero_unpaired"),
     "num_kl_rows"),
    ("kto", dict(desirable=torch.tensor([0.5, 1.0, 0.0, 1.0]), kl=0.1), "desirable"),
    ("dpo", dict(trl_metrics="yes"), "trl_metrics"),
    ("dpo", dict(ignore_index=-100.0), "ignore_index"),
    ("mppo_point_ce", dict(group_sizes=[2, 2], scores=torch.tensor([8.0, 3.0, 5.0, 5.0])), "scores"),
    ("simpo", dict(sft_weight=-1.0), "sft_weight"),
    ("tdpo2", dict(alpha=-0.5), "alpha"),
    ("dpo", dict(ignore_index=True), "ignore_index"),
])
def test_front_door_values(loss, kwargs, arg):
    with pytest.raises(ValueError, match=re.escape(f"`{arg}`")):
        _front(loss, **kwargs)


@pytest.mark.parametrize("loss_type", ["nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
                                       "apo_down", ["sigmoid", "bco_pair"]])
def test_f_divergence_is_refused_where_the_loss_type_does_not_apply_it(loss_type):
    """These loss types read the plain log-ratios: forward_kl with them would silently train reverse-KL DPO."""
    pc, pr, rc, rr = (torch.randn(4) for _ in range(4))
    with pytest.raises(ValueError, match="`f_divergence_type`"):
        fastpref.dpo_loss(pc, pr, rc, rr, loss_type=loss_type, f_divergence_type="forward_kl")
    fastpref.dpo_loss(pc, pr, rc, rr, loss_type=loss_type)  # reverse_kl (the default) is what they mean


# ---------------------------------------------------------------- shapes and gradients of tensor settings


def test_tensor_settings_that_would_broadcast_are_refused():
    """A [B, 1] tensor setting turned the [B] losses into [B, B] and their mean into another loss."""
    column = torch.tensor([[0.1], [0.2]])
    raises("beta", fastpref.dpo_loss, A, B, RA, RB, beta=column)
    raises("gamma_beta_ratio", fastpref.simpo_loss, A, B, gamma_beta_ratio=column)
    raises("beta", _front, "dpo", beta=column)
    pol, ref, d = torch.tensor([-3.0, -4.0, -5.0]), torch.tensor([-3.5, -4.0, -4.5]), torch.tensor([1, 0, 1])
    for kl in (torch.tensor([[0.1], [0.2], [0.3]]), torch.tensor([0.1, 0.2, 0.3])):  # z is one value per batch
        raises("kl", fastpref.kto_loss, pol, ref, d, kl=kl)
    one, _ = fastpref.kto_loss(pol, ref, d, kl=torch.tensor([0.2]), reduction="none")  # an all-reduced [1] is fine
    assert torch.allclose(one, fastpref.kto_loss(pol, ref, d, kl=0.2, reduction="none")[0])


@pytest.mark.parametrize("fn", [fastpref.dpo_plackett_luce_loss, fastpref.lipo_lambda_loss])
def test_per_prompt_beta_of_list_losses_scales_its_prompt(fn):
    """A [B] beta used to broadcast over the K responses (B == K: silently another loss)."""
    g = torch.Generator().manual_seed(0)
    logps, ref, scores = (torch.randn(3, 3, generator=g) for _ in range(3))
    beta = torch.tensor([0.1, 0.5, 2.0])
    per_prompt, _ = fn(logps, ref, scores, beta=beta, reduction="none")
    # each list on its own (LiPO: every list has 3 pairs, so its B / pairs factor is the batch's 3 / 9)
    want = torch.cat([fn(logps[i:i + 1], ref[i:i + 1], scores[i:i + 1], beta=b, reduction="none")[0]
                      for i, b in enumerate(beta.tolist())])
    assert torch.allclose(per_prompt, want)
    raises("beta", fn, logps, ref, scores, beta=torch.tensor([0.1, 0.5]))


@pytest.mark.parametrize("counts", [[0, 4], [-3, 4], [2.5, 4.0], [NAN, 4.0], [float("inf"), 4.0]])
def test_token_counts_are_whole_numbers_of_at_least_one(counts):
    """They were clamped at 1 (a 0 or negative count silently became 1) and fractions were taken as counts."""
    n = torch.tensor(counts)
    raises("chosen_num_tokens", fastpref.dpo_loss, A, B, RA, RB, loss_type="ipo", chosen_num_tokens=n,
           rejected_num_tokens=torch.tensor([3, 4]))


def test_aot_has_no_per_pair_losses():
    """AOT sorts the batch: its 'none' values are sorted positions (TRL's); the front door refuses them."""
    with pytest.warns(UserWarning, match="SORTED"):
        fastpref.dpo_loss(A, B, RA, RB, loss_type="aot", reduction="none")
    raises("reduction", _front, "dpo", loss_type=["sigmoid", "aot_unpaired"], reduction="none")
    raises("reduction", fastpref.PreferenceLoss, "dpo", loss_type="aot", reduction="none")
    hidden, weight, labels, ref_hidden = make_batch(4, seed=5)
    for reduction in ("mean", "sum"):
        out = fastpref.preference_loss(hidden, weight, labels, loss_type="aot", ref_hidden=ref_hidden,
                                       reduction=reduction, backend="torch")
        again = fastpref.preference_loss(hidden, weight, labels, loss_type="aot", ref_hidden=ref_hidden,
                                         reduction="mean", backend="torch").loss * (2 if reduction == "sum" else 1)
        assert torch.allclose(out.loss, again)


def test_f_divergence_with_sft_alone_is_refused():
    """'sft' is in TRL's f-divergence list but reads no log-ratio: forward_kl would change nothing."""
    n = torch.tensor([3, 4])
    raises("f_divergence_type", fastpref.dpo_loss, A, B, RA, RB, loss_type="sft", f_divergence_type="forward_kl",
           chosen_num_tokens=n, rejected_num_tokens=n)
    both, _, _ = fastpref.dpo_loss(A, B, RA, RB, loss_type=["sigmoid", "sft"], f_divergence_type="forward_kl",
                                   chosen_num_tokens=n, rejected_num_tokens=n)
    assert torch.isfinite(both)


def test_targets_carry_no_gradient():
    """MMPO's soft labels / quality scores are targets: the loss used to push gradients into them."""
    labels = torch.tensor([0.3, 0.8], requires_grad=True)
    scores = torch.tensor([1.0, 2.0], requires_grad=True)
    pc = A.clone().requires_grad_()
    fastpref.mmpo_loss(pc, B, RA, RB, soft_labels=labels)[0].backward()
    fastpref.mmpo_loss(pc, B, RA, RB, chosen_scores=scores, rejected_scores=torch.zeros(2), bt_beta=1.0)[0].backward()
    assert labels.grad is None and scores.grad is None and pc.grad is not None


def test_precomputed_reference_gets_no_gradient_at_the_front_door():
    """Reference log-probs computed with grad (say by the policy with adapters off) pushed gradients into it."""
    hidden, weight, labels, _ = make_batch(4, seed=5)
    ref = torch.tensor([-20.0, -21.0, -19.0, -22.0], requires_grad=True)
    out = fastpref.preference_loss(hidden.requires_grad_(), weight, labels, ref_logps=ref, backend="torch")
    out.loss.backward()
    assert ref.grad is None and hidden.grad is not None


def test_calibrate_with_one_tensor_names_the_missing_one():
    raises("rejected_entropy", fastpref.calibrate_dispersion_c, torch.tensor([1.0, 2.0]), vocab_size=100)


# ---------------------------------------------------------------- found by a review of this release


def test_per_example_settings_must_have_one_entry_per_example():
    """A [3] beta against one pair broadcast the loss to three values (their mean another loss)."""
    one = (A[:1], B[:1], RA[:1], RB[:1])
    three = torch.tensor([0.1, 0.5, 2.0])
    raises("beta", fastpref.dpo_loss, *one, beta=three)
    raises("beta", fastpref.simpo_loss, *one[:2], beta=three)
    raises("gamma_beta_ratio", fastpref.simpo_loss, *one[:2], gamma_beta_ratio=three)
    raises("beta", fastpref.mallows_dpo_loss, *one, neg_log_dispersion=1.0, beta=three)
    raises("beta", fastpref.tdpo_loss, *one, torch.zeros(1), torch.zeros(1), beta=three)
    raises("beta", _front, "simpo", rows=2, beta=three)
    raises("desirable_weight", fastpref.kto_loss, A[:1], RA[:1], torch.tensor([True]), kl=0.0,
           desirable_weight=torch.tensor([1.0, 2.0]))
    per_pair, _, _ = fastpref.dpo_loss(A, B, RA, RB, beta=torch.tensor([0.1, 0.3]), reduction="none")
    assert per_pair.shape == (2,)


def test_mallows_mixing_alpha_and_home_advantage_are_refused_where_they_weigh_nothing():
    """h = (r_w - a r_ref,w) - (r_l - a r_ref,l) - (1 - a) gamma': reference-free with gamma' = 0, `a` did nothing."""
    raises("mixing_alpha", fastpref.mallows_dpo_loss, A, B, neg_log_dispersion=1.0, mixing_alpha=0.25)
    raises("mixing_alpha", _front, "mallows_dpo", neg_log_dispersion=1.0, mixing_alpha=0.25)
    raises("home_advantage", fastpref.mallows_dpo_loss, A, B, RA, RB, neg_log_dispersion=1.0, mixing_alpha=1.0,
           home_advantage=0.5)
    # where it acts, it is honoured: with a reference, and (reference-free) through the home advantage
    with_ref, _, _ = fastpref.mallows_dpo_loss(A, B, RA, RB, neg_log_dispersion=1.0, mixing_alpha=0.25)
    plain, _, _ = fastpref.mallows_dpo_loss(A, B, RA, RB, neg_log_dispersion=1.0)
    assert not torch.allclose(with_ref, plain)
    mixed, _, _ = fastpref.mallows_dpo_loss(A, B, neg_log_dispersion=1.0, mixing_alpha=0.5, home_advantage=0.5,
                                            reduction="none")
    half, _, _ = fastpref.mallows_dpo_loss(A, B, neg_log_dispersion=1.0, home_advantage=0.25, reduction="none")
    assert torch.allclose(mixed, half)


def test_alphapo_reward_is_finite_for_summed_log_probs():
    """(1 - p^-a)/a with p = exp(logp) gave NaN below logp ~ -103 (exp underflows to 0 in fp32)."""
    pc, pr = torch.tensor([-120.0, -490.0]), torch.tensor([-150.0, -480.0])
    losses, cr, rr = fastpref.cpo_loss(pc, pr, alpha=0.1, cpo_alpha=0.0, reduction="none")
    r64 = lambda x: (1 - torch.exp(-0.1 * x.double())) / 0.1  # noqa: E731  (p^-a = exp(-a logp))
    want = -torch.nn.functional.logsigmoid(0.1 * (r64(pc) - r64(pr)))
    assert torch.isfinite(losses).all() and torch.allclose(losses.double(), want, rtol=1e-5)
    assert torch.allclose(cr.double(), 0.1 * r64(pc), rtol=1e-5)


def test_an_nll_term_given_with_weight_zero_is_refused():
    """simpo_loss(policy_nll_loss=...) with the default sft_weight=0 dropped the term without a word."""
    nll = torch.tensor(2.0)
    raises("policy_nll_loss", fastpref.simpo_loss, A, B, policy_nll_loss=nll)
    raises("policy_nll_loss", fastpref.cpo_loss, A, B, cpo_alpha=0.0, policy_nll_loss=nll)
    raises("policy_nll_loss", fastpref.orpo_loss, A / 10, B / 10, nll_weight=0.0, policy_nll_loss=nll)
    logps, scores = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[3.0, 2.0, 1.0]])
    raises("policy_sum_logps", fastpref.pro_loss, logps, scores, logps * 5, sft_weight=0.0)
    # the front door still runs each with the term off, and logs what TRL logs
    for loss, off in (("simpo", {}), ("cpo", {"cpo_alpha": 0.0}), ("orpo", {"nll_weight": 0.0})):
        out = _front(loss, **off)
        assert torch.isfinite(out.loss) and (loss == "simpo") == ("nll_loss" not in out.metrics)


def test_a_zero_loss_weight_drops_its_type_and_its_settings():
    """label_smoothing for a sigmoid weighted 0 was accepted (and ignored); all-zero weights trained nothing."""
    raises("label_smoothing", fastpref.dpo_loss, A, B, RA, RB, loss_type=["sigmoid", "hinge"],
           loss_weights=[0.0, 1.0], label_smoothing=0.3)
    raises("discopop_tau", fastpref.dpo_loss, A, B, RA, RB, loss_type=["discopop", "hinge"],
           loss_weights=[0.0, 1.0], discopop_tau=0.1)
    raises("loss_weights", fastpref.dpo_loss, A, B, RA, RB, loss_weights=[0.0])
    smoothed, _, _ = fastpref.dpo_loss(A, B, RA, RB, loss_type=["sigmoid", "hinge"], loss_weights=[1.0, 0.0],
                                       label_smoothing=0.3)
    alone, _, _ = fastpref.dpo_loss(A, B, RA, RB, label_smoothing=0.3)
    assert torch.allclose(smoothed, alone)


def test_mppo_point_scores_carry_no_gradient():
    logps = torch.tensor([[-0.5, -1.0, -2.0]], requires_grad=True)
    scores = torch.tensor([[0.9, 0.5, 0.1]], requires_grad=True)
    for fn in (fastpref.mppo_point_ce_loss, fastpref.mppo_point_mse_loss):
        fn(logps, scores)[0].backward()
    assert scores.grad is None and logps.grad is not None


def test_zero_weighted_loss_types_are_not_computed():
    """A type weighted 0 still ran: exo_pair's log(0) raised, robust's 1/(1 - 2 eps) made the loss NaN."""
    for types, extra in ((["sigmoid", "exo_pair"], {}), (["sigmoid", "robust"], {"label_smoothing": 0.0}),
                         (["sigmoid", "sft"], {})):  # sft weighted 0 needs no token counts
        losses, _, _ = fastpref.dpo_loss(A, B, RA, RB, loss_type=types, loss_weights=[1.0, 0.0], **extra)
        assert torch.allclose(losses, fastpref.dpo_loss(A, B, RA, RB)[0])


def test_one_element_tensor_settings_broadcast_and_scalar_ones_are_refused_per_example():
    """A [1] beta (say nn.Parameter(torch.ones(1))) is unambiguous; a [B] tie_alpha or cpo_alpha had obscure errors."""
    one, _, _ = fastpref.dpo_loss(A, B, RA, RB, beta=torch.nn.Parameter(torch.tensor([0.1])))
    assert torch.allclose(one, fastpref.dpo_loss(A, B, RA, RB, beta=0.1)[0])
    assert torch.isfinite(_front("dpo", beta=torch.tensor([0.1])).loss)
    raises("tie_alpha", fastpref.todo_loss, A, B, RA, RB, ties=torch.tensor([0, 1]), tie_alpha=torch.tensor([0.5, 0.4]))
    raises("cpo_alpha", fastpref.cpo_loss, A, B, cpo_alpha=torch.tensor([1.0, 0.5]), policy_nll_loss=torch.tensor(2.0))


def test_alphapo_with_positive_alpha_is_finite_where_fp32_exp_overflows():
    losses, _, _ = fastpref.cpo_loss(torch.tensor([-400.0, -50.0]), torch.tensor([-420.0, -60.0]), alpha=0.25,
                                     cpo_alpha=0.0, reduction="none")
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all()


def test_construction_checks_accept_tensor_and_per_batch_settings_and_keep_the_rng():
    """check_values tried a tensor home_advantage as absent (a false refusal) and drew from the global RNG."""
    fastpref.PreferenceLoss("mallows_dpo", mixing_alpha=0.5, home_advantage=torch.tensor([0.1, 0.2]))
    fastpref.PreferenceLoss("mallows_dpo", mixing_alpha=0.5)  # home_advantage may come with each batch
    state = torch.random.get_rng_state()
    fastpref.PreferenceLoss("mppo_pair_single", negative="random")
    fastpref.PreferenceLoss("mppo_pair_single", negative="worst")
    assert torch.equal(state, torch.random.get_rng_state())
