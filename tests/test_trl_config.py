"""FastPrefDPOConfig / FastPrefKTOConfig: every TRL loss field honoured or refused by name, typos refused at
construction (before any dataset or model work), and the fastpref fields given on the command line."""

from __future__ import annotations

import json
import tempfile

import pytest

pytest.importorskip("trl")

from fastpref.integrations import trl as fp_trl  # noqa: E402


def _dpo(**overrides):
    return fp_trl.FastPrefDPOConfig(output_dir=tempfile.mkdtemp(prefix="fastpref-test-"), use_cpu=True, bf16=False,
                                    report_to="none", **overrides)


def _kto(**overrides):
    return fp_trl.FastPrefKTOConfig(output_dir=tempfile.mkdtemp(prefix="fastpref-test-"), use_cpu=True, bf16=False,
                                    report_to="none", **overrides)


# ---- a named loss reads fastpref_loss_kwargs only: TRL's loss fields must stay at their defaults ----


@pytest.mark.parametrize("loss, field, value, hint", [
    ("dpo", "loss_type", ["ipo"], "fastpref_loss_kwargs={'loss_type': 'ipo'}"),
    ("simpo", "loss_type", ["hinge"], "fastpref_loss_kwargs={'loss_type': 'hinge'}"),
    ("mallows_dpo", "loss_type", ["hinge"], "has no `loss_type`"),
    ("dpo", "label_smoothing", 0.1, "fastpref_loss_kwargs={'label_smoothing': 0.1}"),
    ("dpo", "f_divergence_type", "js_divergence", "fastpref_loss_kwargs={'f_divergence_type'"),
    ("dpo", "loss_weights", [0.5], "fastpref_loss_kwargs={'loss_weights': [0.5]}"),
    ("mallows_dpo", "loss_weights", [0.5], "has no `loss_weights`"),
    ("dpo", "discopop_tau", 0.1, "fastpref_loss_kwargs={'discopop_tau': 0.1}"),
    ("dpo", "f_alpha_divergence_coef", 0.3, "fastpref_loss_kwargs={'f_alpha_divergence_coef'"),
    ("simpo", "use_weighting", True, "fastpref_loss_kwargs={'use_weighting': True}"),
    ("mallows_dpo", "beta", 0.5, "fastpref_loss_kwargs={'beta': 0.5}"),
    ("simpo", "beta", 0.1, "fastpref_loss_kwargs={'beta': 0.1}"),  # TRL's default value, set explicitly
    ("pro", "beta", 0.5, "has no `beta`"),
])
def test_named_loss_refuses_trl_loss_fields(loss, field, value, hint):
    with pytest.raises(ValueError, match=f"`{field}`") as err:
        _dpo(fastpref_loss=loss, **{field: value})
    assert hint in str(err.value), str(err.value)


def test_named_loss_takes_its_hyperparameters_from_kwargs():
    args = _dpo(fastpref_loss="simpo", fastpref_loss_kwargs={"beta": 2.5, "use_weighting": True})
    plan = fp_trl.loss_from_config(args)
    assert (plan.loss, plan.hparams) == ("simpo", {"beta": 2.5, "use_weighting": True})
    assert args.beta is None  # not TRL's 0.1: the named loss's own default applies


# ---- TRL's loss (fastpref_loss=None): honoured as TRL does, or refused where TRL would ignore it ----


def test_trl_loss_fields_are_honoured():
    args = _dpo(beta=0.3, loss_type=["robust", "hinge"], loss_weights=[1.0, 0.5], label_smoothing=0.2,
                use_weighting=True)
    plan = fp_trl.loss_from_config(args)
    assert plan.loss == "dpo"
    assert plan.hparams["beta"] == 0.3 and plan.hparams["loss_type"] == ["robust", "hinge"]
    assert plan.hparams["loss_weights"] == [1.0, 0.5] and plan.hparams["label_smoothing"] == 0.2
    assert plan.hparams["use_weighting"] is True
    assert _dpo().beta == 0.1  # TRL's default when TRL's loss runs


@pytest.mark.parametrize("overrides, field", [
    ({"label_smoothing": 0.1}, "label_smoothing"),  # sigmoid: TRL >= 0.29 ignores it, fastpref's dpo would not
    ({"label_smoothing": 0.1, "loss_type": ["ipo"]}, "label_smoothing"),  # no loss type uses it
    ({"discopop_tau": 0.2}, "discopop_tau"),
    ({"f_alpha_divergence_coef": 0.3}, "f_alpha_divergence_coef"),
    ({"f_divergence_type": "forward_kl", "loss_type": ["nca_pair"]}, "f_divergence_type"),  # plain log-ratios
    ({"fastpref_loss_kwargs": {"beta": 2.0}}, "fastpref_loss_kwargs"),  # a DPOConfig field: set it there
    ({"ld_alpha": 0.5}, "ld_alpha"),
])
def test_trl_loss_settings_that_would_be_ignored_are_refused(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        _dpo(**overrides)


# ---- typos fail at construction, listing what is accepted ----


@pytest.mark.parametrize("overrides, match", [
    ({"fastpref_loss": "mallows_dpo", "fastpref_loss_kwargs": {"bta": 2.0}}, r"`bta`.*beta"),
    ({"fastpref_loss": "no_such_loss"}, r"`loss` must be one of"),
    ({"fastpref_chunk_size": 0}, "fastpref_chunk_size"),
    ({"fastpref_chunk_size": True}, "fastpref_chunk_size"),
    ({"fastpref_logits_budget": -1}, "fastpref_logits_budget"),
    ({"fastpref_backend": "gpu"}, r"fastpref_backend.*torch"),
    ({"fastpref_loss": "mmpo", "fastpref_batch_columns": ["soft_label"]}, r"soft_label'"),
    ({"fastpref_loss": "mmpo", "fastpref_batch_columns": "soft_labels"}, "list of column names"),
    ({"fastpref_loss": "kto"}, "FastPrefKTOTrainer"),
    ({"fastpref_loss": "tdpo2", "precompute_ref_log_probs": True}, "precompute_ref_log_probs"),
    ({"fastpref_loss": "simpo", "precompute_ref_log_probs": True}, "precompute_ref_log_probs"),
    ({"fastpref_loss": "pro", "truncation_mode": "keep_end"}, "truncation_mode"),
    # values too, before any reference precompute (the loss runs once on a synthetic batch)
    ({"fastpref_loss": "mallows_dpo", "fastpref_loss_kwargs": {"beta": -5.0}}, r"`beta` must be finite"),
    ({"fastpref_loss": "mallows_dpo", "fastpref_loss_kwargs": {"dispersion": "bogus"}}, "`dispersion`"),
    ({"fastpref_loss": "mallows_dpo", "fastpref_loss_kwargs": {"length_normalization": "yes"}},
     "`length_normalization`"),
    ({"fastpref_loss": "simpo", "fastpref_loss_kwargs": {"beta": "10"}}, "`beta` must be a real number"),
    # reference settings that would not act (TRL ignores them)
    ({"ref_model_mixup_alpha": 0.9}, "`ref_model_mixup_alpha`.*sync_ref_model"),
    ({"ref_model_sync_steps": 1}, "`ref_model_sync_steps`"),
    ({"precompute_ref_batch_size": 64}, "`precompute_ref_batch_size`"),
    ({"fastpref_loss": "simpo", "sync_ref_model": True}, "`sync_ref_model`.*never reads"),
])
def test_bad_settings_fail_at_construction(overrides, match):
    with pytest.raises(ValueError, match=match):
        _dpo(**overrides)


def test_kto_config_maps_trl_fields_and_checks_options():
    args = _kto(beta=0.3, loss_type="apo_zero_unpaired", desirable_weight=1.5, undesirable_weight=0.7,
                fastpref_chunk_size=16)
    plan = fp_trl.kto_loss_from_config(args)
    assert plan.loss == "kto" and plan.chunk_size == 16
    assert plan.hparams == {"beta": 0.3, "loss_type": "apo_zero_unpaired", "desirable_weight": 1.5,
                            "undesirable_weight": 0.7}
    with pytest.raises(ValueError, match="fastpref_backend"):
        _kto(fastpref_backend="gpu")
    with pytest.raises(ValueError, match="`ref_model_mixup_alpha`"):
        fp_trl.kto_loss_from_config(_kto(ref_model_mixup_alpha=0.9))
    with pytest.raises(ValueError, match="`loss_type` must be one of"):  # TRL's 'bco' is not KTO's loss here
        fp_trl.kto_loss_from_config(_kto(loss_type="bco"))


# ---- the command line ----


def test_fastpref_fields_parse_on_the_command_line():
    from transformers import HfArgumentParser

    out = tempfile.mkdtemp(prefix="fastpref-test-")
    (args,) = HfArgumentParser(fp_trl.FastPrefDPOConfig).parse_args_into_dataclasses([
        "--output_dir", out, "--use_cpu", "--report_to", "none", "--fastpref_loss", "mmpo",
        "--fastpref_loss_kwargs", json.dumps({"beta": 2.0, "bt_beta": 0.5}), "--fastpref_batch_columns", "soft_labels",
        "--fastpref_chunk_size", "64", "--fastpref_backend", "torch",
    ])
    assert args.fastpref_loss_kwargs == {"beta": 2.0, "bt_beta": 0.5}
    assert args.fastpref_batch_columns == ["soft_labels"] and args.fastpref_chunk_size == 64
    plan = fp_trl.loss_from_config(args)
    assert (plan.loss, plan.hparams, plan.backend) == ("mmpo", {"beta": 2.0, "bt_beta": 0.5}, "torch")
    with pytest.raises(ValueError, match="`bta`"):
        HfArgumentParser(fp_trl.FastPrefDPOConfig).parse_args_into_dataclasses([
            "--output_dir", out, "--use_cpu", "--fastpref_loss", "mmpo", "--fastpref_loss_kwargs", '{"bta": 2.0}'])
    with pytest.raises(ValueError, match="JSON object"):
        _dpo(fastpref_loss="mmpo", fastpref_loss_kwargs="beta=2")
    (kto,) = HfArgumentParser(fp_trl.FastPrefKTOConfig).parse_args_into_dataclasses([
        "--output_dir", out, "--use_cpu", "--fastpref_logits_budget", "1024", "--loss_type", "apo_zero_unpaired"])
    assert kto.fastpref_logits_budget == 1024 and fp_trl.kto_loss_from_config(kto).hparams["loss_type"] == (
        "apo_zero_unpaired")


def test_construction_checks_leave_per_batch_settings_to_the_batch():
    """A hyperparameter that comes per batch (a column) is not there at construction: no false refusal."""
    _dpo(fastpref_loss="mallows_dpo", fastpref_loss_kwargs={"mixing_alpha": 0.5},
         fastpref_batch_columns=["home_advantage"])
    _dpo(fastpref_loss="mmpo", fastpref_loss_kwargs={"bt_beta": 2.0},
         fastpref_batch_columns=["chosen_scores", "rejected_scores"])
    _dpo(fastpref_loss="todo", fastpref_loss_kwargs={"tie_alpha": 0.3}, fastpref_batch_columns=["ties"])
