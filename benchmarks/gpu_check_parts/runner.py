"""Runs a part's cases in worker processes (a crash or a hang costs one case), and the unit-test part."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

from .config import FASTPREF_IMPORT_ERROR, PART_BUDGET_S, REPO, Case, Config, Skip, free_device_memory
from .correctness import correctness_cases
from .env import environment
from .head import bench_cases
from .report import finite
from .trainer import trainer_cases
from .tune import tune_cases

SCRIPT = REPO / "benchmarks" / "gpu_check.py"  # what a worker process runs
UNIT_TEST_FILES = ("tests/test_backends.py", "tests/test_triton.py", "tests/test_token_stats.py")
DRY_TESTS_SELECT = "shift_labels or empty_chunk"  # a few quick unit tests for --dry


def _emit(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(finite(record)) + "\n")


def worker(part: str, cfg: Config, work_file: Path, skip: set[str], faults: dict[str, str]) -> int:
    """Run a part's cases in order, one JSON line when each starts and ends. Exit 3 after a CUDA fault
    (the context is unusable: the parent starts a fresh worker for the rest).

    ``faults`` (``--fault CASE=crash|hang``, for the check's own test) makes a case kill its process or hang.
    """
    if FASTPREF_IMPORT_ERROR:
        raise SystemExit(f"cannot import fastpref: {FASTPREF_IMPORT_ERROR}")
    for case in part_cases(part, cfg):
        if case.name in skip:
            continue
        _emit(work_file, {"case": case.name, "event": "start", "time": time.time()})
        if faults.get(case.name) == "crash":
            os._exit(70)
        if faults.get(case.name) == "hang":
            time.sleep(3600)
        start = time.perf_counter()
        fault = False
        try:
            result = case.run(cfg)
            status = result.pop("status", "ok")
        except Skip as reason:
            result, status = {"reason": str(reason)}, "skipped"
        except Exception as error:  # noqa: BLE001 - every failure is a result
            fault = "CUDA error" in str(error) or "device-side assert" in str(error)
            result = {"error": f"{type(error).__name__}: {error}"[:2000],
                      "traceback": traceback.format_exc()[-3000:]}
            status = "error"
        result.update(case=case.name, event="end", status=status, seconds=round(time.perf_counter() - start, 3))
        _emit(work_file, result)
        print(f"[{part}] {case.name}: {status} ({result['seconds']:.1f} s)", flush=True)
        if fault:
            return 3
        free_device_memory()
    return 0


def _read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
            pass
    return out


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_part(part: str, cfg: Config, ctx: "Context") -> dict:
    """Run ``part``'s cases in worker processes until all are done or its time is up."""
    cases = part_cases(part, cfg)
    timeouts = {c.name: min(c.timeout_s, ctx.time_limits.get(c.name, math.inf), ctx.time_limits.get("", math.inf))
                for c in cases}
    budget = min(PART_BUDGET_S[part], ctx.deadline - time.time())
    started = time.time()
    part_deadline = started + budget
    work_file = ctx.work / f"{part}.jsonl"
    log_file = ctx.work / f"{part}.log"
    final: dict[str, dict] = {}
    while len(final) < len(cases) and time.time() < part_deadline:
        seen = len(_read_records(work_file))
        cmd = [sys.executable, str(SCRIPT), "--worker", part, "--work", str(work_file)] + (["--dry"] if cfg.dry else [])
        for name in final:
            cmd += ["--skip", name]
        for name, kind in ctx.faults.items():
            cmd += ["--fault", f"{name}={kind}"]
        with log_file.open("a") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ctx.env, cwd=REPO,
                                    start_new_session=True)
            reason = None
            while proc.poll() is None:
                time.sleep(0.2)
                running = _running_case(_read_records(work_file))
                now = time.time()
                if now > part_deadline:
                    reason = f"part budget of {budget:.0f} s used up"
                elif running and now - running["time"] > timeouts[running["case"]]:
                    reason = f"case time limit of {timeouts[running['case']]:.0f} s"
                if reason:
                    _kill(proc)
                    break
        records = _read_records(work_file)
        for r in records:
            if r.get("event") == "end":
                final[r["case"]] = r
        running = _running_case(records)
        if running and running["case"] not in final:
            if reason:  # stopped by its own time limit (a hang: a failure) or by the part's (not a verdict)
                status, why = "timeout" if reason.startswith("case") else "stopped", reason
            else:
                status, why = "crashed", f"worker exit status {proc.returncode}"
            record = {"case": running["case"], "event": "end", "status": status, "error": why,
                      "seconds": round(time.time() - running["time"], 1), "log_tail": _tail(log_file)}
            _emit(work_file, record)  # the next worker's watch must not see this case as running
            final[running["case"]] = record
        elif len(records) == seen and reason is None:
            # The worker ran no case (an import error): another one would not either.
            for c in cases:
                final.setdefault(c.name, {"case": c.name, "status": "error",
                                          "error": f"worker ran no case (exit {proc.returncode}): "
                                                   + _tail(log_file, 1)[-300:], "log_tail": _tail(log_file)})
    for c in cases:
        final.setdefault(c.name, {"case": c.name, "status": "not run", "error": "part time budget used up"})
    ctx.append_log(part, log_file)
    ordered = [final[c.name] for c in cases]
    return {"status": _part_status(ordered), "seconds": round(time.time() - started, 1), "budget_s": round(budget),
            "cases": ordered}


def _running_case(records: list[dict]) -> dict | None:
    """The last case that started and has not ended."""
    ended = {r["case"] for r in records if r.get("event") == "end"}
    starts = [r for r in records if r.get("event") == "start" and r["case"] not in ended]
    return starts[-1] if starts else None


def _part_status(cases: list[dict]) -> str:
    statuses = {c["status"] for c in cases}
    if statuses & {"failed", "error", "crashed", "timeout"}:
        return "failed"
    if statuses & {"not run", "stopped"}:
        return "partial"
    return "ok"


def part_cases(part: str, cfg: Config) -> list[Case]:
    return {"env": lambda c: [Case("environment", environment, 60)], "correctness": correctness_cases,
            "bench": bench_cases, "trainer": trainer_cases, "tune": tune_cases}[part](cfg)


@dataclass
class Context:
    out: Path
    work: Path
    env: dict
    deadline: float
    time_limits: dict = field(default_factory=dict)  # case name (or "" for every case) -> seconds
    faults: dict = field(default_factory=dict)

    def log(self, text: str) -> None:
        print(text, flush=True)
        with (self.out / "check.log").open("a") as f:
            f.write(text + "\n")

    def append_log(self, part: str, path: Path) -> None:
        with (self.out / "check.log").open("a") as f:
            f.write(f"\n----- {part}: worker output -----\n")
            f.write(path.read_text(errors="replace") if path.exists() else "(none)\n")


# ==================================================================================== part 1b: unit tests


def run_tests(cfg: Config, ctx: "Context", files=UNIT_TEST_FILES) -> dict:
    """The backends' unit tests with their tensors on the device, in one pytest process."""
    budget = min(PART_BUDGET_S["tests"], ctx.deadline - time.time())
    paths = [f for f in files if (REPO / f).exists()]
    if not paths:
        return {"status": "failed", "error": f"none of {files} exists", "seconds": 0, "budget_s": round(budget)}
    junit = ctx.out / "junit.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", *paths, "-v", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    if cfg.dry:
        cmd += ["-k", DRY_TESTS_SELECT]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", "60"]
    env = {**ctx.env, "FASTPREF_TEST_DEVICE": cfg.device}
    log_file = ctx.work / "tests.log"
    start = time.time()
    with log_file.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            proc.wait(timeout=max(1.0, budget))
            note = None
        except subprocess.TimeoutExpired:
            _kill(proc)
            note = f"pytest stopped at the part budget of {budget:.0f} s"
    ctx.append_log("tests", log_file)
    result = _junit_summary(junit) if junit.exists() else _verbose_summary(log_file.read_text(errors="replace"))
    result.update(command=" ".join(cmd[2:]), files=paths, exit_status=proc.returncode,
                  seconds=round(time.time() - start, 1), budget_s=round(budget))
    if note:
        result["note"] = note
    ran = result["passed"] + result["failed"] + result["errors"]
    if result["failed"] or result["errors"] or note or ran == 0:
        result["status"] = "failed"
        if ran == 0:
            result.setdefault("note", "no test ran")
    else:
        result["status"] = "ok"
    result["log_tail"] = _tail(log_file, 15)
    return result


def _junit_summary(path: Path) -> dict:
    root = ElementTree.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            key = "failed" if "failure" in kinds else "errors"
            counts[key] += 1
            child = case.find("failure") if "failure" in kinds else case.find("error")
            failures.append({"test": name, "message": (child.get("message") or "")[:300]})
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures[:50], "source": "junit"}


def _verbose_summary(text: str) -> dict:
    """Outcomes from ``pytest -v`` lines, for a run stopped before it wrote its junit file."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for name, outcome in re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", text, re.M):
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors"}.get(outcome, "skipped")
        counts[key] += 1
        if key in ("failed", "errors"):
            failures.append({"test": name, "message": outcome})
    return {**counts, "failures": failures[:50], "source": "pytest -v output"}
