"""FastPrefLegacyDPOMixin: refused on TRL >= 0.29 (where ``dpo_loss`` is never called), and on a REAL legacy
TRL (0.28, in the side environment ``./run.sh`` builds) step-by-step parity with the plain ``DPOTrainer``,
MallowsPO's first step against the functional, its metrics logged, TRL settings it would ignore refused.

The legacy checks run ``tests/legacy_trl_check.py`` with the side environment's python, named by
``FASTPREF_LEGACY_PYTHON`` (``./run.sh test`` sets it); without it they are skipped."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("trl")

from integration_helpers import make_model, make_pairs, make_tokenizer  # noqa: E402
from legacy_trl_check import CHECKS  # noqa: E402

from fastpref.integrations import trl as fp_trl  # noqa: E402

TESTS = Path(__file__).resolve().parent
VOCAB = 512


def test_mixin_on_trl_1x_trainer_is_refused_naming_the_right_class():
    """TRL >= 0.29 never calls dpo_loss: the mixin on its DPOTrainer would train plain sigmoid DPO."""
    from trl import DPOConfig, DPOTrainer

    try:
        version = fp_trl.check_trl("legacy")
    except RuntimeError:
        pass
    else:
        pytest.skip(f"the installed TRL {version} is a legacy one")

    class Trainer(fp_trl.FastPrefLegacyDPOMixin, DPOTrainer):
        fastpref_loss = "mallows_dpo"

    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="fastpref-test-"), max_steps=1, report_to="none",
                     use_cpu=True, precompute_ref_log_probs=False)
    with pytest.raises(RuntimeError, match="FastPrefDPOTrainer"):
        Trainer(make_model(VOCAB), args=args, train_dataset=make_pairs(4, VOCAB), processing_class=make_tokenizer(VOCAB))


@pytest.fixture(scope="module")
def legacy_results():
    python = os.environ.get("FASTPREF_LEGACY_PYTHON")
    if not python or not Path(python).exists():
        pytest.skip("no legacy-TRL side environment: FASTPREF_LEGACY_PYTHON is unset or missing "
                    "(./run.sh test builds one and sets it)")
    root = str(TESTS.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, str(TESTS)]), TQDM_DISABLE="1")
    out = subprocess.run([python, str(TESTS / "legacy_trl_check.py")], capture_output=True, text=True, env=env,
                         cwd=root, timeout=900)
    results = {}
    for line in out.stdout.splitlines():
        if line.startswith('{"check"'):
            record = json.loads(line)
            results[record["check"]] = record
    if out.returncode != 0 or "version" not in results:
        pytest.fail(f"the legacy-TRL checks did not run (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return results


@pytest.mark.slow
def test_side_environment_has_a_legacy_trl(legacy_results):
    # the check script starts with fastpref's own version gate, check_trl("legacy")
    assert legacy_results["version"]["ok"], legacy_results["version"]


@pytest.mark.slow
@pytest.mark.parametrize("check", list(CHECKS))
def test_legacy_trl(legacy_results, check):
    record = legacy_results.get(check)
    assert record is not None, f"check {check!r} did not report"
    assert record["ok"], record["detail"]
    print(check, record["detail"])
