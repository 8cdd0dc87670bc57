"""Hyperparameters are checked against the loss before any heavy work (LossSpec.check_hparams)."""

from __future__ import annotations

import re
from unittest import mock

import pytest
import torch

import fastpref
import fastpref.modules
from oracle import make_batch


def _no_fused_pass(*args, **kwargs):
    raise AssertionError("the fused pass ran before the hyperparameters were checked")


def test_misspelt_hyperparameter_fails_before_the_fused_pass():
    hidden, weight, labels, ref_hidden = make_batch(4)
    with mock.patch.object(fastpref.modules, "token_stats", _no_fused_pass):
        with pytest.raises(ValueError, match=r"`bta` is not a hyperparameter of loss 'dpo' \(did you mean 'beta'\?\)"
                                             r"; it accepts: beta, discopop_tau, "):
            fastpref.preference_loss(hidden, weight, labels, ref_hidden=ref_hidden, bta=0.1)
        with pytest.raises(ValueError, match="`use_weighting`"):
            fastpref.preference_loss(hidden, weight, labels, ref_hidden=ref_hidden, use_weighting="no")


def test_module_checks_at_construction():
    with pytest.raises(ValueError, match="`bta`"):
        fastpref.PreferenceLoss("dpo", bta=0.1)
    with pytest.raises(ValueError, match="`alpha`.*tdpo1"):  # TDPO1 has no alpha: refused, not ignored
        fastpref.PreferenceLoss("tdpo1", alpha=0.5)
    with pytest.raises(ValueError, match="`use_weighting`"):
        fastpref.PreferenceLoss("kto", use_weighting=True)
    # values too: the loss runs once on a synthetic batch of its layout
    for loss, bad in (("dpo", {"beta": -5.0}), ("kto", {"loss_type": "bco"}), ("lipo_lambda", {"beta": 0.0}),
                      ("mppo_pair_single", {"negative": "best"}), ("dpo", {"loss_weights": [0.0]})):
        with pytest.raises(ValueError, match=f"`{next(iter(bad))}`"):
            fastpref.PreferenceLoss(loss, **bad)
    fastpref.PreferenceLoss("todo", tie_alpha=0.3)  # its per-batch `ties` are not there yet: left to the batch
    criterion = fastpref.PreferenceLoss("simpo", beta=2.0, backend="torch", trl_metrics=True)  # front-door options pass
    hidden, weight, labels, _ = make_batch(4)
    assert torch.isfinite(criterion(hidden, weight, labels).loss)


@pytest.mark.parametrize("loss", fastpref.available_losses())
def test_accepted_names_are_the_functional_losses_keywords(loss):
    """Every accepted name is a keyword of the functional loss or an adapter option; the adapter's own are not."""
    spec = fastpref.get_loss(loss)
    values = {"use_weighting": False, "reference_free": True}  # the two whose values are checked here
    spec.check_hparams({name: values.get(name, 1) for name in spec.hyperparameters})
    for adapter_argument in ("reduction", "mask", "policy_nll_loss", "chosen_num_tokens", "tdpo2"):
        assert adapter_argument not in spec.hyperparameters
        with pytest.raises(ValueError, match=re.escape(f"`{adapter_argument}`")):
            spec.check_hparams({adapter_argument: 1})
    assert spec.function is not None and spec.function.__name__ == f"{loss}_loss"


def test_every_registry_name_has_its_function():
    for loss in fastpref.available_losses():
        assert getattr(fastpref.losses, f"{loss}_loss") is fastpref.get_loss(loss).function
