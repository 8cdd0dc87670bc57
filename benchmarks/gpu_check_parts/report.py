"""results.json, results.md (a section a part) and the summary printed at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path


def finite(x):
    """JSON without NaN/Infinity (strict parsers reject them)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def _fmt(x, digits=2) -> str:
    return "" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown(results: dict) -> str:
    env = next((c for c in results["parts"].get("env", {}).get("cases", [])), {})
    lines = [f"# fastpref GPU check{' (dry run: CPU, Triton interpreter, tiny shapes)' if results['dry'] else ''}", "",
             f"{results['started']}, {env.get('gpu', 'no GPU')}, torch {env.get('torch', '?')}, "
             f"triton {env.get('triton', '?')}, budget {results['budget_s']} s, "
             f"elapsed {results.get('elapsed_s', '?')} s",
             "", "| part | status | seconds | budget (s) |", "|---|---|---:|---:|"]
    for name, part in results["parts"].items():
        lines.append(f"| {name} | {part['status']} | {part.get('seconds', '')} | {part.get('budget_s', '')} |")
    wheels = results.get("wheels", {})
    lines += ["", f"Wheels: {wheels.get('status')} {', '.join(wheels.get('wheels', []))}"]
    if results.get("fastpref_import_error"):
        lines += ["", f"**fastpref does not import here**: {results['fastpref_import_error']}"]
    if wheels.get("unmet_requirements"):
        lines += ["Unmet requirements of the wheels:"] + [f"- {u}" for u in wheels["unmet_requirements"]]
    for name, part in results["parts"].items():
        lines += ["", f"## {name}", ""]
        if part["status"] in ("not run", "error") and not part.get("cases") and name != "tests":
            lines.append(f"{part['status']}: {part.get('error', '')}")
        else:
            lines += SECTIONS.get(name, _cases_section)(part)
    return "\n".join(lines) + "\n"


def _env_section(part: dict) -> list[str]:
    if not part.get("cases"):
        return [f"not run: {part.get('error', '')}"]
    case = part["cases"][0]
    return [f"- {k}: {v}" for k, v in case.items() if k not in ("case", "event")]


def _cases_section(part: dict) -> list[str]:
    lines = ["| case | status | worst check (value vs bound) | s |", "|---|---|---|---:|"]
    for c in part["cases"]:
        detail = c.get("worst") or c.get("reason") or c.get("error", "")
        lines.append(f"| {c['case']} | {c['status']} | {str(detail)[:160]} | {_fmt(c.get('seconds'), 1)} |")
    failed = [(c["case"], k) for c in part["cases"] for k in c.get("checks", []) if not k["ok"]]
    if failed:
        lines += ["", "Failed checks:"] + [f"- {case}: {k['what']} = {k['value']:.4g} > {k['bound']:.4g}"
                                           for case, k in failed[:60]]
    return lines


def _tests_section(part: dict) -> list[str]:
    lines = [f"`{part.get('command', '')}`: {part.get('passed', 0)} passed, {part.get('failed', 0)} failed, "
             f"{part.get('errors', 0)} errors, {part.get('skipped', 0)} skipped ({part.get('source', '')})"]
    if part.get("note") or part.get("error"):
        lines.append(f"Note: {part.get('note') or part.get('error')}")
    lines += [f"- {f['test']}: {f['message'][:200]}" for f in part.get("failures", [])]
    return lines


def _bench_section(part: dict) -> list[str]:
    rows = {c["case"]: c for c in part["cases"]}
    floors = [(k, rows[k]["ms"]) for k in ("gemm_floor", "gemm_floor_4") if "ms" in rows.get(k, {})]
    header = ["case", "ms (median)", "min–max"] + [f"÷ {k}" for k, _ in floors] + [
        "peak extra GiB", "beyond grads GiB", "target", "status"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 3) + "---|---|"]
    for c in part["cases"]:
        if "ms" not in c:
            cells = [c["case"]] + [""] * (len(header) - 2)
            cells.append(f"{c['status']}: {str(c.get('reason') or c.get('error', ''))[:100]}")
        else:
            target = ", ".join(f"{k} ≤ {v}" for k, v in c.get("target", {}).items())
            if target:
                target += " (met)" if c.get("target_met") else " (NOT met)"
            cells = [c["case"], f"{c['ms']:.2f}", f"{c['ms_min']:.2f}–{c['ms_max']:.2f}"]
            cells += [f"{c['ms'] / ms:.2f}" for _, ms in floors]
            cells += [_fmt(c.get("peak_extra_GiB")), _fmt(c.get("beyond_grads_GiB")), target, c["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _trainer_section(part: dict) -> list[str]:
    lines = ["| variant | step (s) | peak GiB | step peak GiB | loss | status |", "|---|---:|---:|---:|---:|---|"]
    for c in part["cases"]:
        lines.append(f"| {c['case']} | {_fmt(c.get('step_s'))} | {_fmt(c.get('peak_GiB'))} | "
                     f"{_fmt(c.get('step_peak_GiB'))} | {_fmt(c.get('loss'), 6)} | {c['status']} "
                     f"{str(c.get('reason') or c.get('error', ''))[:100]} |")
    losses = [c["loss"] for c in part["cases"] if c.get("loss") is not None]
    if len(losses) > 1:
        lines.append(f"\nLargest loss difference between variants: {max(losses) - min(losses):.3g}")
    return lines


def _tune_section(part: dict) -> list[str]:
    lines = ["| setting | ms (median) | peak extra GiB | status |", "|---|---:|---:|---|"]
    for c in part["cases"]:
        lines.append(f"| {c['case']} | {_fmt(c.get('ms'))} | {_fmt(c.get('peak_extra_GiB'))} | {c['status']} "
                     f"{str(c.get('reason') or c.get('error', ''))[:100]} |")
    return lines


SECTIONS = {"env": _env_section, "tests": _tests_section, "bench": _bench_section, "trainer": _trainer_section,
            "tune": _tune_section}


def write_reports(out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(finite(results), indent=1))
    (out / "results.md").write_text(markdown(results))


def summary(results: dict) -> str:
    lines = ["", "=" * 100, "fastpref GPU check: summary" + (" (dry)" if results["dry"] else "")]
    if results.get("fastpref_import_error"):
        lines.append(f"fastpref does not import here: {results['fastpref_import_error']}")
    for name, part in results["parts"].items():
        counts = {}
        for c in part.get("cases", []):
            counts[c["status"]] = counts.get(c["status"], 0) + 1
        if name == "tests":
            counts = {k: part.get(k, 0) for k in ("passed", "failed", "errors", "skipped")}
        lines.append(f"{name:<12} {part['status']:<8} {part.get('seconds', 0):>6} s of {part.get('budget_s', '?'):>4}  "
                     + ", ".join(f"{v} {k}" for k, v in counts.items()))
        for f in part.get("failures", [])[:10]:
            lines.append(f"    failed: {f['test']}: {f['message'][:150]}")
        for c in part.get("cases", []):
            if c["status"] in ("failed", "error", "crashed", "timeout"):
                lines.append(f"    {c['status']}: {c['case']}: {str(c.get('worst') or c.get('error', ''))[:150]}")
    bench = results["parts"].get("bench")
    if bench and bench.get("cases"):
        lines += [""] + _bench_section(bench)
    lines.append(f"results: {results['out']}/results.md, results.json, check.log")
    return "\n".join(lines)
