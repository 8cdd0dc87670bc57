"""The resolver of what level 1 computes (fastpref.needs.resolve_needs), case by case, and the front door obeying it."""

from __future__ import annotations

import dataclasses
import re
import warnings
from unittest import mock

import pytest
import torch

import fastpref
import fastpref.modules
from fastpref.needs import Needs, resolve_needs
from oracle import make_batch


def needs(loss, hparams=None, *, logps=False, entropy=False, head=False, nll_labels=False) -> Needs:
    return resolve_needs(fastpref.get_loss(loss), hparams or {}, ref_logps=logps, ref_entropy=entropy,
                         ref_head=head, nll_labels=nll_labels)


def plan(n: Needs) -> tuple:
    return (n.reference_free, n.ref_logps, n.ref_entropy, n.kl, n.run_ref_head, n.policy_entropy, n.unused)


#   (loss, hparams, provided (logps, entropy, head)) -> (reference_free, ref_logps, ref_entropy, kl, run head,
#                                                         policy entropy, unused)
CASES = [
    ("dpo", {}, (True, False, False), (None, "precomputed", None, False, False, False, ())),
    ("dpo", {}, (False, False, True), (None, "head", None, False, True, False, ())),
    ("dpo", {}, (True, False, True), (None, "precomputed", None, False, False, False, ("ref_head",))),
    ("dpo", {}, (True, True, False), (None, "precomputed", None, False, False, False, ("ref_entropy",))),
    ("lipo_lambda", {}, (False, False, True), (None, "head", None, False, True, False, ())),
    ("simpo", {}, (False, False, False), (None, None, None, False, False, False, ())),
    ("simpo", {}, (True, False, True), (None, None, None, False, False, False, ("ref_logps", "ref_head"))),
    ("mppo_pair_mnm", {}, (False, False, True), (None, None, None, False, False, False, ("ref_head",))),
    # MallowsPO: reference-free by default (the official config), reference entropy from wherever it is
    ("mallows_dpo", {}, (False, False, True), (True, None, "head", False, True, False, ())),
    ("mallows_dpo", {}, (False, True, False), (True, None, "precomputed", False, False, False, ())),
    ("mallows_dpo", {}, (False, True, True), (True, None, "precomputed", False, False, False, ("ref_head",))),
    ("mallows_dpo", {}, (False, False, False), (True, None, "policy", False, False, True, ())),
    ("mallows_dpo", {}, (True, False, True), (True, None, "head", False, True, False, ("ref_logps",))),
    ("mallows_ipo", {"reference_free": False}, (True, True, False),
     (False, "precomputed", "precomputed", False, False, False, ())),
    ("mallows_phi_dpo", {"reference_free": False}, (False, False, True), (False, "head", "head", False, True, False, ())),
    ("mallows_dpo", {"reference_free": False}, (True, False, True),
     (False, "precomputed", "head", False, True, False, ())),
    # a given psi needs no entropy at all (the front door used to compute one anyway)
    ("mallows_dpo", {"neg_log_dispersion": 1.0}, (False, False, False), (True, None, None, False, False, False, ())),
    ("mallows_dpo", {"neg_log_dispersion": 1.0}, (False, True, True),
     (True, None, None, False, False, False, ("ref_entropy", "ref_head"))),
    ("mallows_dpo", {"neg_log_dispersion": 1.0, "reference_free": False}, (False, False, True),
     (False, "head", None, False, True, False, ())),
    # TDPO: the per-token KL needs the head even when the log-probs are precomputed
    ("tdpo2", {}, (False, False, True), (None, "head", None, True, True, False, ())),
    ("tdpo1", {}, (True, False, True), (None, "precomputed", None, True, True, False, ())),
    ("kto", {}, (True, False, False), (None, "precomputed", None, False, False, False, ())),
]


@pytest.mark.parametrize("loss, hparams, provided, expected", CASES)
def test_resolve_needs(loss, hparams, provided, expected):
    logps, entropy, head = provided
    assert plan(needs(loss, hparams, logps=logps, entropy=entropy, head=head)) == expected


@pytest.mark.parametrize("loss, hparams, provided, arg", [
    ("dpo", {}, (False, False, False), "ref_chosen_logps"),
    ("lipo_lambda", {}, (False, False, False), "ref_logps"),          # list layout: the per-sequence name
    ("kto", {}, (False, False, False), "ref_logps"),
    ("mallows_dpo", {"reference_free": False}, (False, True, False), "ref_chosen_logps"),
    ("tdpo2", {}, (True, False, False), "ref_hidden"),                 # KL needs the head
    ("tdpo1", {}, (False, False, False), "ref_hidden"),
    ("mallows_dpo", {"reference_free": "no"}, (False, False, True), "reference_free"),
])
def test_missing_or_bad_inputs_are_refused(loss, hparams, provided, arg):
    logps, entropy, head = provided
    with pytest.raises(ValueError, match=re.escape(f"`{arg}`")):
        needs(loss, hparams, logps=logps, entropy=entropy, head=head)


def test_nll_term():
    assert needs("cpo").nll and needs("orpo").nll and not needs("simpo").nll
    assert needs("simpo", {"sft_weight": 0.5}).nll
    assert not needs("cpo", {"cpo_alpha": 0.0}).nll and not needs("orpo", {"nll_weight": 0.0}).nll
    assert needs("cpo", nll_labels=True).nll
    for loss, hparams in (("dpo", {}), ("cpo", {"cpo_alpha": 0.0}), ("simpo", {}), ("pro", {})):
        with pytest.raises(ValueError, match="`nll_labels`"):
            needs(loss, hparams, logps=True, nll_labels=True)


def test_needs_is_a_frozen_plan():
    n = needs("dpo", logps=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        n.kl = True


# ---------------------------------------------------------------- the front door follows the plan


def _spy_level1(loss, **kwargs):
    """Runs preference_loss, returning the keyword arguments of every token_stats call it made."""
    hidden, weight, labels, ref_hidden = make_batch(4, seed=3)
    calls = []
    real = fastpref.modules.token_stats

    def spy(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    with mock.patch.object(fastpref.modules, "token_stats", spy):
        fastpref.preference_loss(hidden, weight, labels, loss=loss, backend="torch",
                                 **{k: (ref_hidden if v == "ref_hidden" else v) for k, v in kwargs.items()})
    return calls


def test_front_door_computes_no_entropy_when_psi_is_given():
    (call,) = _spy_level1("mallows_dpo", neg_log_dispersion=1.0)
    assert not call["entropy"] and not call["ref_entropy"] and call["ref_hidden"] is None
    (call,) = _spy_level1("mallows_dpo")  # no psi, no reference: the policy's entropy stands in
    assert call["entropy"] and not call["ref_entropy"]


def test_front_door_runs_the_reference_head_only_when_needed():
    rc = torch.zeros(2)
    with pytest.warns(UserWarning, match="ref_hidden"):
        (call,) = _spy_level1("dpo", ref_chosen_logps=rc, ref_rejected_logps=rc, ref_hidden="ref_hidden")
    assert call["ref_hidden"] is None and not call["kl"]
    (call,) = _spy_level1("tdpo2", ref_hidden="ref_hidden")
    assert call["ref_hidden"] is not None and call["kl"]
    (call,) = _spy_level1("mallows_dpo", ref_hidden="ref_hidden")
    assert call["ref_hidden"] is not None and call["ref_entropy"] and not call["entropy"]


def test_unused_reference_inputs_warn_naming_the_fix():
    rc = torch.zeros(2)
    with pytest.warns(UserWarning, match=r"reference_free=False"):
        _spy_level1("mallows_dpo", ref_chosen_logps=rc, ref_rejected_logps=rc)
    with pytest.warns(UserWarning, match=r"simpo.*`ref_chosen_logps`/`ref_rejected_logps` are not used"):
        _spy_level1("simpo", ref_chosen_logps=rc, ref_rejected_logps=rc)
    with pytest.warns(UserWarning, match=r"`neg_log_dispersion` is given"):
        _spy_level1("mallows_dpo", neg_log_dispersion=1.0, ref_chosen_entropy=rc + 1, ref_rejected_entropy=rc + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what the loss uses gives no warning
        _spy_level1("mallows_dpo", reference_free=False, ref_chosen_logps=rc, ref_rejected_logps=rc)
