"""The prepared GPU check (benchmarks/gpu_check.py) cannot rot: its --dry run does every part on CPU.

One dry run (Triton interpreter, tiny shapes, CUDA-only peers skipped) with a probe wheel to install, a
case that kills its worker and one that hangs; then the checks' comparison logic against the oracle.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402

PARTS = ("env", "correctness", "bench", "tests", "trainer", "tune")
CRASH, HANG = "gemm_floor_4", "naive"


def _probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel needing torch (installed) and a package that exists nowhere."""
    folder.mkdir()
    path = folder / "fastpref_probe-1.0-py3-none-any.whl"
    info = "fastpref_probe-1.0.dist-info"
    files = {
        "fastpref_probe/__init__.py": "VALUE = 1\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: fastpref-probe\nVersion: 1.0\n"
                            "Requires-Dist: torch>=1.0\nRequires-Dist: fastpref-no-such-package>=1\n"
                            'Requires-Dist: pytest; extra == "test"\n',
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return folder


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "out"
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry", "--tune", "--out", str(out),
           "--wheels", str(_probe_wheel(tmp / "wheels")), "--fault", f"{CRASH}=crash", "--fault", f"{HANG}=hang",
           "--time-limit", f"{HANG}=3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    results = json.loads((out / "results.json").read_text())
    return done, results, (out / "results.md").read_text(), out


def _cases(results, part):
    return {c["case"]: c for c in results["parts"][part]["cases"]}


@pytest.mark.slow
def test_every_part_runs_and_reports(dry_run):
    done, results, md, out = dry_run
    assert list(results["parts"]) == list(PARTS), done.stdout[-3000:]
    for part in PARTS:
        assert f"## {part}" in md
    for part in ("env", "correctness", "trainer", "tune"):
        assert results["parts"][part]["status"] == "ok", (part, results["parts"][part])
    # every correctness kind ran and checked something
    correctness = results["parts"]["correctness"]["cases"]
    assert len(correctness) == len(gpu_check.DRY_CORRECTNESS)
    assert all(c["status"] == "ok" and c["checks"] for c in correctness)
    tests = results["parts"]["tests"]
    assert tests["status"] == "ok" and tests["passed"] >= 1 and tests["source"] == "junit", tests
    assert (out / "junit.xml").exists() and (out / "check.log").stat().st_size > 0
    trainer = _cases(results, "trainer")
    assert {c["loss"] for c in trainer.values()} and all(c["step_s"] > 0 for c in trainer.values())
    tune = _cases(results, "tune")
    assert all(c["ms"] > 0 for name, c in tune.items() if name.startswith("chunk"))
    assert "fastpref GPU check: summary (dry)" in done.stdout


@pytest.mark.slow
def test_a_crashed_or_hung_case_is_recorded_and_the_part_goes_on(dry_run):
    done, results, md, _ = dry_run
    bench = _cases(results, "bench")
    assert bench[CRASH]["status"] == "crashed" and "70" in bench[CRASH]["error"]
    assert bench[HANG]["status"] == "timeout"
    others = {name: c["status"] for name, c in bench.items() if name not in (CRASH, HANG)}
    assert set(others.values()) <= {"ok", "skipped"} and others["fastpref"] == "ok", others
    assert {k for k, v in others.items() if v == "skipped"} == {"liger_flce", "cce"}  # need CUDA
    assert bench["fastpref"]["ms"] > 0
    assert results["parts"]["bench"]["status"] == "failed" and done.returncode == 1


@pytest.mark.slow
def test_wheels_are_installed_for_the_workers(dry_run):
    _, results, _, _ = dry_run
    wheels = results["wheels"]
    assert wheels["status"] == "ok" and wheels["wheels"] == ["fastpref_probe-1.0-py3-none-any.whl"]
    assert wheels["unmet_requirements"] == [
        "fastpref-probe needs fastpref-no-such-package>=1 (not installed)"]  # torch is; the extra is ignored
    env = results["parts"]["env"]["cases"][0]
    assert env["from_wheels"] == {"fastpref-probe": "1.0"}  # the workers see the install


def test_compare_flags_errors_beyond_the_bounds():
    head = gpu_check.random_head(2, 6, 16, 301, dtype=torch.float32, device="cpu", ref=True, seed=1)
    labels = gpu_check.random_labels(2, 6, 301, device="cpu", prompt=2, pad=(1, 0))
    up = gpu_check.upstream(labels, gpu_check.DIFFERENTIABLE)
    want = gpu_check.oracle(head, labels, up, block=5, **gpu_check.ALL_STATS)  # blocks of 5 tokens add up
    whole = gpu_check.oracle(head, labels, up, **gpu_check.ALL_STATS)
    assert torch.allclose(want["grads"]["weight"], whole["grads"]["weight"], rtol=1e-12, atol=1e-12)

    def result(stats, grads, dtype=torch.float32):
        return gpu_check.checks_result(gpu_check.compare(stats, grads, want, labels, dtype))

    stats = {k: None if v is None else v.clone() if v.dtype == torch.bool else v.float()
             for k, v in want["stats"].items()}
    grads = {k: v.float() for k, v in want["grads"].items()}
    assert result(stats, grads)["status"] == "ok"
    valid = torch.nonzero(labels.reshape(-1) != -100).squeeze(1)
    ignored = torch.nonzero(labels.reshape(-1) == -100).squeeze(1)

    bad = dict(stats, logp=stats["logp"].clone())
    bad["logp"][valid[0]] += 1e-3
    assert result(bad, grads)["status"] == "failed"
    bad = dict(stats, entropy=stats["entropy"].clone())
    bad["entropy"][ignored[0]] = 1.0  # ignored positions must be exactly zero
    assert result(bad, grads)["status"] == "failed"
    bad = dict(stats, is_top1=stats["is_top1"].clone())
    bad["is_top1"][valid[:2]] = ~bad["is_top1"][valid[:2]]  # two flips: more than a near-tie in fp32
    assert result(bad, grads)["status"] == "failed"
    assert result(dict(stats, kl=None), grads)["status"] == "failed"  # asked for, not returned
    bad_grads = dict(grads, weight=grads["weight"] * (1 + 1e-4))
    assert result(stats, bad_grads)["status"] == "failed"

    # half precision: absolute statistic error up to 2 * 2**-8 * (max|z| + 1), gradients 3e-2 relative
    bound = gpu_check.HALF_STAT_BOUND * want["zmax"]
    half_grads = {k: v.to(torch.bfloat16) for k, v in grads.items()}
    for factor, status in ((0.9, "ok"), (1.1, "failed")):
        shifted = dict(stats, logp=stats["logp"] + factor * bound * (labels.reshape(-1) != -100))
        assert result(shifted, half_grads, torch.bfloat16)["status"] == status, factor
    assert result(stats, {k: v.float() for k, v in half_grads.items()}, torch.bfloat16)["status"] == "failed"  # dtype
