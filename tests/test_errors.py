"""Bad input gets a ValueError that names the argument, before any heavy work."""

import re

import pytest
import torch

import fastpref

BACKEND = "torch"


def good(rows=4, seq=5, d=8, vocab=20):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, vocab, (rows, seq), generator=g)
    labels[:, 0] = -100
    return torch.randn(rows, seq, d, generator=g), torch.randn(vocab, d, generator=g), labels


def raises(arg, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=re.escape(f"`{arg}`")):
        fn(*args, **kwargs)


def test_shapes():
    h, w, y = good()
    raises("hidden", fastpref.token_stats, h[:, :4], w, y)
    raises("weight", fastpref.token_stats, h, w[:, :7], y)
    raises("weight", fastpref.token_stats, h, w[0], y)
    raises("bias", fastpref.token_stats, h, w, y, bias=torch.zeros(19))
    raises("ref_hidden", fastpref.token_stats, h, w, y, ref_hidden=h[:2])
    raises("ref_weight", fastpref.token_stats, h, w, y, ref_hidden=h, ref_weight=w[:10])


def test_dtypes_and_devices():
    h, w, y = good()
    raises("weight", fastpref.token_stats, h, w.double(), y)
    raises("labels", fastpref.token_stats, h, w, y.float())
    raises("weight", fastpref.token_stats, h, w.to("meta"), y)
    raises("bias", fastpref.token_stats, h, w, y, bias=torch.zeros(20, dtype=torch.bfloat16))


@pytest.mark.parametrize("bad", [20, 1000, -1, -5, -101])
def test_label_range(bad):
    h, w, y = good()
    y[1, 2] = bad
    raises("labels", fastpref.token_stats, h, w, y, backend=BACKEND)


def test_custom_ignore_index_is_respected():
    h, w, y = good()
    y[y == -100] = -1
    stats = fastpref.token_stats(h, w, y, ignore_index=-1, backend=BACKEND)
    assert torch.all(stats.logp[:, 0] == 0)
    raises("labels", fastpref.token_stats, h, w, y, backend=BACKEND)  # -1 is not ignore_index=-100


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_hidden(value):
    h, w, y = good()
    h[2, 3, 1] = value
    raises("hidden", fastpref.token_stats, h, w, y, backend=BACKEND)
    h2, _, _ = good()
    h2[0, 1, 0] = value
    raises("ref_hidden", fastpref.token_stats, good()[0], w, y, ref_hidden=h2, backend=BACKEND)


@pytest.mark.parametrize("arg", ["weight", "bias"])
def test_non_finite_head(arg):
    h, w, y = good()
    b = torch.zeros(20)
    (w if arg == "weight" else b)[3] = float("nan")
    raises(arg, fastpref.token_stats, h, w, y, bias=b, backend=BACKEND)


def test_non_finite_precomputed_reference():
    h, w, y = good()
    raises("ref_chosen_logps", fastpref.preference_loss, h, w, y, loss="dpo",
           ref_chosen_logps=torch.tensor([0.0, float("nan")]), ref_rejected_logps=torch.zeros(2), backend=BACKEND)


def test_options():
    h, w, y = good()
    raises("ref_hidden", fastpref.token_stats, h, w, y, kl=True)
    raises("ref_hidden", fastpref.token_stats, h, w, y, ref_entropy=True)
    raises("chunk_size", fastpref.token_stats, h, w, y, chunk_size=0)
    raises("logits_budget", fastpref.token_stats, h, w, y, logits_budget=-1)
    raises("softcap", fastpref.token_stats, h, w, y, softcap=-3.0)
    raises("temperature", fastpref.token_stats, h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        fastpref.token_stats(h, w, y, backend="cuda-magic")


def test_sequence_without_valid_tokens():
    h, w, y = good()
    y[2] = -100
    raises("labels", fastpref.sequence_logps, h, w, y, backend=BACKEND)
    raises("labels", fastpref.preference_loss, h, w, y, loss="simpo", backend=BACKEND)


def test_packing():
    h, w, y = good()
    raises("labels", fastpref.sequence_logps, h.reshape(-1, 8), w, y.reshape(-1), backend=BACKEND)  # 1-D without cu_seqlens
    flat_h, flat_y = h.reshape(1, -1, 8), y.reshape(1, -1)
    raises("cu_seqlens", fastpref.sequence_logps, flat_h, w, flat_y, cu_seqlens=torch.tensor([0, 5, 12]))
    raises("cu_seqlens", fastpref.sequence_logps, flat_h, w, flat_y, cu_seqlens=torch.tensor([0, 12, 5, 20]))
    raises("cu_seqlens", fastpref.sequence_logps, flat_h, w, flat_y, cu_seqlens=torch.tensor([0.0, 20.0]))
    raises("seq_ids", fastpref.sequence_logps, flat_h, w, flat_y, seq_ids=torch.zeros(7, dtype=torch.long))


def test_pairs():
    h, w, y = good(rows=3)
    raises("labels", fastpref.preference_loss, h, w, y, loss="simpo", backend=BACKEND)  # odd row count
    h, w, y = good()
    raises("ref_chosen_logps", fastpref.preference_loss, h, w, y, loss="dpo", backend=BACKEND)
    raises("ref_chosen_logps", fastpref.preference_loss, h, w, y, loss="dpo", ref_chosen_logps=torch.zeros(3),
           ref_rejected_logps=torch.zeros(2))
    raises("ref_chosen_logps", fastpref.preference_loss, h, w, y, loss="dpo", ref_chosen_logps=torch.zeros(2))
    raises("loss", fastpref.preference_loss, h, w, y, loss="dpo_magic")
    raises("loss", fastpref.PreferenceLoss, "nope")
    raises("reduction", fastpref.preference_loss, h, w, y, loss="simpo", reduction="avg")
    # a reference head's weight without its hidden states would be dropped (with precomputed log-probs it ran nothing)
    refs = dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    raises("ref_hidden", fastpref.preference_loss, h, w, y, loss="dpo", ref_weight=w, **refs)
    raises("ref_hidden", fastpref.preference_loss, h, w, y, loss="dpo", ref_bias=torch.zeros(20), **refs)
    raises("ref_hidden", fastpref.token_stats, h, w, y, ref_weight=w)


def test_functional_losses():
    a, b = torch.zeros(3), torch.zeros(3)
    raises("policy_rejected_logps", fastpref.dpo_loss, a, torch.zeros(4))
    raises("policy_chosen_logps", fastpref.dpo_loss, torch.zeros(3, 1), b)
    raises("policy_chosen_logps", fastpref.dpo_loss, torch.zeros(0), torch.zeros(0))
    raises("ref_chosen_logps", fastpref.dpo_loss, a, b, a)
    raises("ref_chosen_logps", fastpref.dpop_loss, a, b, None, None)
    raises("beta", fastpref.dpo_loss, a, b, beta=0.0)
    raises("loss_type", fastpref.dpo_loss, a, b, loss_type="sigmoidd")
    raises("label_smoothing", fastpref.dpo_loss, a, b, loss_type="exo_pair")
    raises("label_smoothing", fastpref.dpo_loss, a, b, loss_type="robust", label_smoothing=0.5)
    raises("loss_weights", fastpref.dpo_loss, a, b, loss_type=["sigmoid", "ipo"], loss_weights=[1.0])
    raises("chosen_num_tokens", fastpref.dpo_loss, a, b, loss_type="sft")
    raises("f_divergence_type", fastpref.dpo_loss, a, b, f_divergence_type="tv")
    raises("reduction", fastpref.dpo_loss, a, b, reduction="avg")
    raises("ties", fastpref.todo_loss, a, b, a, b, ties=torch.zeros(2))
    raises("bt_beta", fastpref.mmpo_loss, a, b, a, b, chosen_scores=a, rejected_scores=b)
    raises("neg_log_dispersion", fastpref.mallows_dpo_loss, a, b, neg_log_dispersion=torch.ones(2))
    raises("mixing_alpha", fastpref.mallows_dpo_loss, a, b, neg_log_dispersion=1.0, mixing_alpha=2.0)
    raises("form", fastpref.mallows_ipo_loss, a, b, neg_log_dispersion=1.0, form="x")
    raises("link", fastpref.mallows_phi_dpo_loss, a, b, neg_log_dispersion=1.0, link="x")
    raises("dispersion", fastpref.neg_log_dispersion, a + 1, b + 1, vocab_size=10, dispersion="max")
    raises("vocab_size", fastpref.neg_log_dispersion, a + 1, b + 1, vocab_size=1)
    raises("loss_type", fastpref.simpo_loss, a, b, loss_type="ipo")
    raises("loss_type", fastpref.cpo_loss, a, b, loss_type="x")


def test_seq_ids_on_another_device_are_named():
    h, w, y = good()
    ids = torch.arange(4).repeat_interleave(5).to("meta")  # cu_seqlens had this check, seq_ids did not
    raises("seq_ids", fastpref.sequence_logps, h.reshape(1, 20, 8), w, y.reshape(1, 20), seq_ids=ids)


def test_label_dtypes_that_cannot_hold_ignore_index_are_refused():
    """uint8 labels compared -100 as 156: positions labelled 156 were silently ignored."""
    h, w, labels = good()
    raises("labels", fastpref.token_stats, h, w, labels.clamp(min=0).to(torch.uint8), backend=BACKEND)
    raises("labels", fastpref.sequence_logps, h, w, labels.clamp(min=0).to(torch.uint8), backend=BACKEND)
    stats = fastpref.token_stats(h, w, labels.to(torch.int32), backend=BACKEND)  # any dtype that holds -100
    assert torch.equal(stats.logp, fastpref.token_stats(h, w, labels, backend=BACKEND).logp)


def test_reduce_tokens_refuses_labels_scored_with_another_ignore_index():
    """token_stats(ignore_index=-1) then reduce_tokens with the default -100 divided by the wrong counts."""
    h, w, labels = good()
    labels = labels.masked_fill(labels == -100, -1)
    stats = fastpref.token_stats(h, w, labels, ignore_index=-1, backend=BACKEND)
    raises("labels", fastpref.reduce_tokens, stats, labels)
    assert fastpref.reduce_tokens(stats, labels, ignore_index=-1).num_tokens.tolist() == [4] * 4


def test_sequence_logps_refuses_the_token_level_metrics():
    """mean_logits / is_top1 were computed and dropped (SequenceStats has no field for them)."""
    h, w, labels = good()
    raises("mean_logits", fastpref.sequence_logps, h, w, labels, mean_logits=True, backend=BACKEND)
    raises("is_top1", fastpref.sequence_logps, h, w, labels, is_top1=True, backend=BACKEND)


def test_token_weights_are_checked_where_used_and_dropped_where_ignored():
    """A NaN weight at an ignored position turned the weighted sums NaN; a NaN where used went unchecked."""
    h, w, labels = good()
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1))
    clean = fastpref.sequence_logps(h, w, labels, logp_weights=weights, backend=BACKEND).weighted_sum_logp
    dirty = weights.masked_fill(labels == -100, float("nan"))
    seq = fastpref.sequence_logps(h, w, labels, logp_weights=dirty, backend=BACKEND)
    assert torch.equal(seq.weighted_sum_logp, clean)
    used = weights.clone()
    used[0, 2] = float("inf")
    raises("logp_weights", fastpref.sequence_logps, h, w, labels, logp_weights=used, backend=BACKEND)
