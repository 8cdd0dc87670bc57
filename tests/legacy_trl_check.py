"""FastPrefLegacyDPOMixin on a REAL legacy TRL (0.9 - 0.28), run by tests/test_trl_legacy.py in the side
environment that ``./run.sh`` builds (its own TRL/transformers; this repository on ``PYTHONPATH``).

Prints one JSON object per check on stdout: ``{"check": name, "ok": bool, "detail": ...}``; exits 0 when
it ran all checks (the test reads the verdicts), non-zero if it could not run at all.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import traceback
import warnings

import torch

from integration_helpers import make_model, make_pairs, make_tokenizer

VOCAB = 512


def _args(**overrides):
    from trl import DPOConfig

    settings = dict(output_dir=tempfile.mkdtemp(prefix="fastpref-legacy-"), max_steps=3, learning_rate=1e-3,
                    per_device_train_batch_size=4, logging_steps=1, save_strategy="no", report_to="none", seed=0,
                    use_cpu=True, bf16=False, disable_tqdm=True)
    settings.update(overrides)
    return DPOConfig(**settings)


def _steps(trainer):
    return [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]


def _trainer(cls, args, *, pairs=16, ref_seed=0, data_seed=0):
    return cls(make_model(VOCAB), ref_model=make_model(VOCAB, seed=ref_seed).eval(), args=args,
               train_dataset=make_pairs(pairs, VOCAB, seed=data_seed), processing_class=make_tokenizer(VOCAB))


def parity(**config):
    """``fastpref_loss="dpo"`` through the mixin == the plain legacy DPOTrainer, every logged value, step by step."""
    from trl import DPOTrainer

    from fastpref.integrations.trl import FastPrefLegacyDPOMixin

    class FastPrefDPO(FastPrefLegacyDPOMixin, DPOTrainer):
        fastpref_loss = "dpo"

    theirs = _trainer(DPOTrainer, _args(**config))
    theirs.train()
    ours = _trainer(FastPrefDPO, _args(**config))
    ours.train()
    a, b = _steps(ours), _steps(theirs)
    assert len(a) == len(b) == 3, (len(a), len(b))
    # each step's loss is logged rounded to 4 digits; their mean is not
    a[-1]["train_loss"], b[-1]["train_loss"] = (t.state.log_history[-1]["train_loss"] for t in (ours, theirs))
    worst = {}
    for step, (x, y) in enumerate(zip(a, b)):
        assert set(y) <= set(x), f"step {step}: missing {set(y) - set(x)}"
        for key, value in y.items():
            worst[key] = max(worst.get(key, 0.0), abs(x[key] - value))
    bad = {k: v for k, v in worst.items() if v > 1e-5}
    assert not bad, f"differences over 1e-5: {bad}"
    return {k: v for k, v in worst.items() if k not in ("epoch", "learning_rate", "step")}


def _completion_stats(model, prompt_ids, completion_ids):
    """Summed log-prob, mean log-prob, mean entropy of ``completion_ids`` after ``prompt_ids``, in plain torch."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].double()
    logp = torch.log_softmax(logits, -1)
    token_logp = logp.gather(-1, torch.tensor(completion_ids)[:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return token_logp.sum(), token_logp.mean(), entropy.mean()


def mallows():
    """MallowsPO through the mixin: step 1 loss and psi == the functional on plain-torch log-probs/entropies."""
    import fastpref
    from trl import DPOTrainer

    from fastpref.integrations.collators import WithColumns
    from fastpref.integrations.trl import FastPrefLegacyDPOMixin, reference_columns

    class MallowsTrainer(FastPrefLegacyDPOMixin, DPOTrainer):
        fastpref_loss = "mallows_dpo"
        fastpref_loss_kwargs = {"beta": 10.0, "reference_free": False}

    pairs = 8
    args = _args(max_steps=1, per_device_train_batch_size=pairs, remove_unused_columns=False)
    trainer = _trainer(MallowsTrainer, args, pairs=pairs, ref_seed=1, data_seed=3)  # reference != policy
    reference = make_model(VOCAB, seed=1).eval()
    trainer.train_dataset = reference_columns(reference, trainer.train_dataset, pad_token_id=0)
    trainer.data_collator = WithColumns(trainer.data_collator, ["ref_chosen_entropy", "ref_rejected_entropy"])
    rows = trainer.train_dataset
    policy = make_model(VOCAB).eval()  # the policy before its first update
    stats = {"pc": [], "pr": [], "rc": [], "rr": [], "hc": [], "hr": []}
    for i in range(pairs):
        prompt = rows[i]["prompt_input_ids"]
        for side, key in (("c", "chosen_input_ids"), ("r", "rejected_input_ids")):
            _, mean_logp, _ = _completion_stats(policy, prompt, rows[i][key])
            _, ref_mean_logp, ref_entropy = _completion_stats(reference, prompt, rows[i][key])
            stats[f"p{side}"].append(mean_logp)
            stats[f"r{side}"].append(ref_mean_logp)
            stats[f"h{side}"].append(ref_entropy)
    s = {k: torch.stack(v).float() for k, v in stats.items()}
    # A random-init reference is nearly uniform (psi ~ 0 with the official c): calibrate c so the mean psi is 1.
    c = fastpref.calibrate_dispersion_c(s["hc"], s["hr"], vocab_size=VOCAB)
    trainer.fastpref_loss_kwargs = {**MallowsTrainer.fastpref_loss_kwargs, "dispersion_c": c}
    psi = fastpref.neg_log_dispersion(s["hc"], s["hr"], vocab_size=VOCAB, c=c)
    want, chosen, rejected = fastpref.mallows_dpo_loss(s["pc"], s["pr"], s["rc"], s["rr"], neg_log_dispersion=psi,
                                                       beta=10.0)
    trainer.train()
    got = _steps(trainer)[0]
    got["loss"] = trainer.state.log_history[-1]["train_loss"]  # the logged step loss is rounded to 4 digits
    detail = {"loss": got["loss"], "expected": want.item(), "neg_log_dispersion": got.get("neg_log_dispersion"),
              "expected_psi": psi.mean().item()}
    assert abs(want.item() - math.log(2)) > 1e-2, f"step-1 loss {want.item()} is log 2: the check would be vacuous"
    assert abs(got["loss"] - want.item()) < 1e-5, detail
    assert "neg_log_dispersion" in got, f"the loss's own metric is not logged: {sorted(got)}"
    assert abs(got["neg_log_dispersion"] - psi.mean().item()) < 1e-5, detail
    assert abs(got["rewards/chosen"] - chosen.mean().item()) < 1e-5, (got["rewards/chosen"], chosen.mean().item())
    assert abs(got["rewards/rejected"] - rejected.mean().item()) < 1e-5
    return detail


def refused_settings():
    """TRL's own loss fields that a named fastpref loss would ignore are refused when the first step runs."""
    from trl import DPOTrainer

    from fastpref.integrations.trl import FastPrefLegacyDPOMixin

    class SimPOTrainer(FastPrefLegacyDPOMixin, DPOTrainer):
        fastpref_loss = "simpo"

    messages = {}
    for field, value in (("loss_type", ["ipo"]), ("label_smoothing", 0.1)):
        trainer = _trainer(SimPOTrainer, _args(max_steps=1, **{field: value}))
        try:
            trainer.train()
        except ValueError as err:
            messages[field] = str(err)
            assert f"`{field}`" in str(err), str(err)
        else:
            raise AssertionError(f"{field}={value!r} with fastpref_loss='simpo' trained")
    return messages


def missing_inputs_refused():
    """MallowsPO without the reference-entropy columns (nor a fixed ``neg_log_dispersion``), and a loss input
    named in ``fastpref_batch_columns`` that the batch lacks, are refused rather than trained without."""
    from trl import DPOTrainer

    from fastpref.integrations.trl import FastPrefLegacyDPOMixin

    class MallowsTrainer(FastPrefLegacyDPOMixin, DPOTrainer):
        fastpref_loss = "mallows_dpo"

    class TiesTrainer(FastPrefLegacyDPOMixin, DPOTrainer):
        fastpref_loss = "todo"
        fastpref_batch_columns = ("tie",)  # not a column of the batch

    messages = {}
    for cls, name, words in ((MallowsTrainer, "mallows", ("`ref_chosen_entropy`", "neg_log_dispersion")),
                             (TiesTrainer, "batch_column", ("`fastpref_batch_columns`", "'tie'"))):
        trainer = _trainer(cls, _args(max_steps=1))
        try:
            trainer.train()
        except ValueError as err:
            assert all(w in str(err) for w in words), str(err)
            messages[name] = str(err)
        else:
            raise AssertionError(f"{cls.__name__} trained without its input")
    return messages


CHECKS = {
    "parity_default": lambda: parity(),
    "parity_beta_label_smoothing": lambda: parity(beta=0.3, label_smoothing=0.1),
    "parity_ipo_hinge_weighted": lambda: parity(loss_type=["ipo", "hinge"], loss_weights=[1.0, 0.5]),
    "parity_sigmoid_sft": lambda: parity(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    "mallows": mallows,
    "refused_settings": refused_settings,
    "missing_inputs_refused": missing_inputs_refused,
}


def main(names):
    import trl

    from fastpref.integrations.trl import check_trl

    check_trl("legacy")
    print(json.dumps({"check": "version", "ok": True, "detail": trl.__version__}), flush=True)
    warnings.simplefilter("ignore")
    for name in names or CHECKS:
        try:
            detail = CHECKS[name]()
            print(json.dumps({"check": name, "ok": True, "detail": detail}), flush=True)
        except Exception:  # noqa: BLE001 - reported to the test as the check's verdict
            print(json.dumps({"check": name, "ok": False, "detail": traceback.format_exc()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
