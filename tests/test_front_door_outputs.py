"""What the front door returns per example, and the NLL term on its own target (``nll_labels``)."""

from __future__ import annotations

import math

import pytest
import torch

import fastpref
from oracle import assert_close, leaves, make_batch, sequence_oracle

# ---------------------------------------------------------------- per-example outputs


def test_pairs_per_example_outputs():
    hidden, weight, labels, ref_hidden = make_batch(6, seed=21)
    out = fastpref.preference_loss(hidden, weight, labels, loss="dpo", ref_hidden=ref_hidden, beta=0.3,
                                   backend="torch")
    loss, metrics = out  # still unpacks as (loss, metrics)
    assert out[0] is loss and out[1] is metrics and len(out) == 2
    o = sequence_oracle(*leaves(hidden, weight), labels, ref_hidden)
    assert_close(out.logps, o["sum_logp"], rtol=1e-5)
    assert_close(out.chosen_logps, o["sum_logp"][:3], rtol=1e-5)
    assert_close(out.rejected_logps, o["sum_logp"][3:], rtol=1e-5)
    rho = o["sum_logp"] - o["ref_sum_logp"]
    assert_close(out.chosen_rewards, 0.3 * rho[:3], rtol=1e-5)
    assert_close(out.rejected_rewards, 0.3 * rho[3:], rtol=1e-5)
    assert_close(out.rewards, 0.3 * rho, rtol=1e-5)
    assert torch.equal(out.num_tokens, (labels != -100).sum(-1))
    assert_close(metrics["rewards/chosen"], out.chosen_rewards.mean(), rtol=1e-6)
    assert not any(x.requires_grad for x in (out.logps, out.rewards))
    per_pair = fastpref.preference_loss(hidden, weight, labels, loss="dpo", ref_hidden=ref_hidden, beta=0.3,
                                        backend="torch", reduction="none")
    assert per_pair.loss.shape == (3,) and torch.allclose(per_pair.loss.mean(), loss)


def test_groups_per_example_outputs():
    sizes = [3, 2]
    hidden, weight, labels, _ = make_batch(5, seed=22)
    scores = torch.tensor([0.2, 0.9, 0.5, 0.3, 0.1])
    out = fastpref.preference_loss(hidden, weight, labels, loss="mppo_pair_mnm", group_sizes=sizes, scores=scores,
                                   backend="torch")
    o = sequence_oracle(*leaves(hidden, weight), labels)
    assert_close(out.rewards, o["mean_logp"].exp(), rtol=1e-5)  # MPPO's reward: p = exp(mean logp), row order
    assert out.chosen_rows.tolist() == [False, True, False, True, False]  # each prompt's best response
    assert_close(out.chosen_rewards, o["mean_logp"].exp()[[1, 3]], rtol=1e-5)
    assert_close(out.metrics["rewards/chosen"], out.chosen_rewards.mean(), rtol=1e-6)


def test_unpaired_per_example_outputs():
    hidden, weight, labels, ref_hidden = make_batch(6, seed=23)
    desirable = torch.tensor([True, False, False, True])
    out = fastpref.preference_loss(hidden, weight, labels, loss="kto", ref_hidden=ref_hidden, desirable=desirable,
                                   num_kl_rows=2, beta=0.5, backend="torch", trl_metrics=True)
    o = sequence_oracle(*leaves(hidden, weight), labels, ref_hidden)
    rho = o["sum_logp"] - o["ref_sum_logp"]
    assert_close(out.rewards[:4], 0.5 * rho[:4], rtol=1e-5)
    assert torch.isnan(out.rewards[4:]).all()  # the KL rows have no reward
    assert_close(out.chosen_rewards, 0.5 * rho[:4][desirable], rtol=1e-5)
    assert out.chosen_rows.tolist() == [True, False, False, True, False, False]
    n = (labels != -100).sum(-1)
    counts = out.token_counts
    assert counts["all"] == n[:4].sum() and counts["chosen"] == n[[0, 3]].sum() and counts["rejected"] == n[[1, 2]].sum()
    # the entropy metric is the token mean over exactly the rows its count covers (not the KL rows)
    stats = fastpref.token_stats(hidden, weight, labels, entropy=True, backend="torch")
    assert_close(out.metrics["entropy"], stats.entropy[:4].sum() / n[:4].sum(), rtol=1e-5)


# ---------------------------------------------------------------- the NLL term, off or on its own target


def _nll_batch(seed=24):
    """Pairs with a 2-token prompt; ``nll_labels`` additionally scores the prompt's second token."""
    hidden, weight, labels, ref_hidden = make_batch(4, seed=seed)
    g = torch.Generator().manual_seed(seed)
    nll_labels = labels.clone()
    nll_labels[:, 1] = torch.randint(0, weight.shape[0], (4,), generator=g)
    return hidden, weight, labels, nll_labels


@pytest.mark.parametrize("loss, hparams", [("orpo", {}), ("cpo", {"beta": 0.2}), ("simpo", {"sft_weight": 0.7})])
def test_nll_labels_match_oracle(loss, hparams):
    hidden, weight, labels, nll_labels = _nll_batch()
    out = fastpref.preference_loss(hidden, weight, labels, loss=loss, nll_labels=nll_labels, backend="torch",
                                   **hparams)
    h64, w64 = leaves(hidden, weight)
    o = sequence_oracle(h64, w64, labels)
    on_target = sequence_oracle(h64, w64, nll_labels)
    nll = -on_target["sum_logp"][:2].sum() / on_target["num_tokens"][:2].sum()  # chosen rows only
    mean = loss != "cpo"
    pc, pr = (o["mean_logp"] if mean else o["sum_logp"]).split(2)
    fn = {"orpo": fastpref.orpo_loss, "cpo": fastpref.cpo_loss, "simpo": fastpref.simpo_loss}[loss]
    expected, _, _ = fn(pc, pr, policy_nll_loss=nll, **hparams)
    assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert_close(out.metrics["nll_loss"], nll, rtol=1e-5)
    out.loss.backward()
    expected.backward()
    assert_close(hidden.grad, h64.grad, rtol=1e-4, atol=1e-6)
    assert_close(weight.grad, w64.grad, rtol=1e-4, atol=1e-6)


def test_nll_labels_read_only_the_chosen_rows_and_default_to_labels():
    hidden, weight, labels, nll_labels = _nll_batch(25)
    base = fastpref.preference_loss(hidden, weight, labels, loss="cpo", backend="torch")
    same = fastpref.preference_loss(hidden, weight, labels, loss="cpo", nll_labels=labels, backend="torch")
    assert_close(same.loss, base.loss, rtol=1e-6)
    other = nll_labels.clone()
    other[2:] = -100  # the rejected rows
    a = fastpref.preference_loss(hidden, weight, labels, loss="orpo", nll_labels=nll_labels, backend="torch")
    b = fastpref.preference_loss(hidden, weight, labels, loss="orpo", nll_labels=other, backend="torch")
    assert_close(a.loss, b.loss, rtol=0, atol=0)


def test_nll_switched_off_through_the_front_door():
    hidden, weight, labels, _ = make_batch(4, seed=26)
    o = sequence_oracle(*leaves(hidden, weight), labels)
    pc, pr = o["mean_logp"].split(2)
    off = fastpref.preference_loss(hidden, weight, labels, loss="orpo", nll_weight=0.0, backend="torch")
    assert_close(off.loss, fastpref.orpo_loss(pc, pr, nll_weight=0.0)[0], rtol=1e-5)
    off = fastpref.preference_loss(hidden, weight, labels, loss="cpo", cpo_alpha=0.0, backend="torch")
    sc, sr = o["sum_logp"].split(2)
    assert_close(off.loss, fastpref.cpo_loss(sc, sr, cpo_alpha=0.0)[0], rtol=1e-5)
    assert math.isfinite(off.metrics["nll_loss"].item())  # still logged, not added


@pytest.mark.parametrize("loss, kwargs", [
    ("dpo", {}),                           # no NLL term
    ("cpo", {"cpo_alpha": 0.0}),           # switched off
    ("simpo", {}),                         # sft_weight=0 by default
    ("orpo", {"nll_labels_shape": True}),  # wrong shape
    ("orpo", {"nll_labels_float": True}),
])
def test_nll_labels_errors(loss, kwargs):
    hidden, weight, labels, ref_hidden = make_batch(4, seed=27)
    nll_labels = labels
    if kwargs.pop("nll_labels_shape", False):
        nll_labels = labels[:, 1:]
    if kwargs.pop("nll_labels_float", False):
        nll_labels = labels.float()
    ref = {"ref_hidden": ref_hidden} if loss == "dpo" else {}
    with pytest.raises(ValueError, match="`nll_labels`"):
        fastpref.preference_loss(hidden, weight, labels, loss=loss, nll_labels=nll_labels, backend="torch", **ref,
                                 **kwargs)
