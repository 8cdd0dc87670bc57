"""The command line: help texts, refused values, and what `demo` / `bench` do without matplotlib."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from fastpref import benchmark, report
from fastpref.cli import COMMANDS, build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_MATPLOTLIB = "import sys; sys.modules['matplotlib'] = None; from fastpref.cli import main; main(sys.argv[1:])"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (group,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(group.choices)


def options(command: str) -> list[argparse.Action]:
    return [a for a in subcommands()[command]._actions if a.option_strings and a.dest != "help"]


def run_cli(*argv: str, blocked_matplotlib: bool = False) -> subprocess.CompletedProcess:
    code = NO_MATPLOTLIB if blocked_matplotlib else "import sys; from fastpref.cli import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_top_level_help_lists_every_command_with_a_sentence(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for name, (_, summary) in COMMANDS.items():
        assert f"{name} {' '.join(summary.split()[:4])}" in out


def test_module_entry_point_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "fastpref", "bench", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--repeats" in out.stdout and "warm" in out.stdout


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_help_text(command):
    for action in options(command):
        assert action.help and len(action.help.split()) >= 3, f"{command} {action.option_strings[0]} has no help"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_numeric_options_refuse_out_of_range_values(command, capsys):
    numeric = [a for a in options(command) if a.type is not None]
    assert numeric, f"{command} has numeric options"
    for action in numeric:
        # every numeric option has a checked type (a bare int or float would take -1 and run)
        assert action.type not in (int, float), f"{command} {action.option_strings[0]} takes any number"
        for bad in ("-1", "x"):
            with pytest.raises(SystemExit) as exit_:
                main([command, action.option_strings[0], bad])
            assert exit_.value.code == 2
            err = capsys.readouterr().err
            assert f"argument {action.option_strings[0]}: must be" in err, err


@pytest.mark.parametrize("argv", [["demo", "--steps", "0"], ["demo", "--batch-pairs", "0"],
                                  ["bench", "--repeats", "0"], ["bench", "--sweep-d", "0"]])
def test_counts_that_must_be_positive_refuse_zero(argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert f"argument {argv[1]}: must be an integer >= 1, got 0" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_refuses_cuda_without_a_gpu(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["bench", "--device", "cuda", "--out", str(tmp_path)])
    assert "argument --device: cuda is not available" in capsys.readouterr().err


def test_odd_sweep_token_counts_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--sweep-tokens", "1024", "1025"])
    assert "argument --sweep-tokens: must be even" in capsys.readouterr().err
    with pytest.raises(ValueError, match="even"):
        benchmark.sweep_shape(1025)


def test_one_repeat_is_timed_after_a_warm_up(monkeypatch):
    calls = []
    monkeypatch.setattr(benchmark, "step", lambda case, batch: calls.append(case))
    row = benchmark.measure_in_process("fastpref", benchmark.PRESETS["ci"], repeats=1)
    assert calls == ["fastpref", "fastpref"]  # a warm-up step (memory, cold time), then the timed one
    assert {"time_s", "cold_time_s", "peak_extra_bytes"} <= set(row) and row["repeats"] == 1
    calls.clear()
    row = benchmark.measure_in_process("fastpref", benchmark.PRESETS["ci"], repeats=0)
    assert calls == ["fastpref"] and "time_s" not in row  # memory only


def test_sweep_skips_a_materialising_case_that_cannot_fit(monkeypatch):
    monkeypatch.setattr(benchmark, "available_bytes", lambda device: 2**20)
    monkeypatch.setattr(benchmark, "measure", lambda *a, **k: pytest.fail("a case that cannot fit was run"))
    rows = benchmark.memory_sweep(("naive",), tokens=(1024,), log=lambda *a, **k: None)
    assert "needs ~" in rows[0]["skipped"] and rows[0]["tokens"] == 1024
    table = benchmark.report_sweep(rows)
    assert "| 1,024 | skipped |" in table and "naive at 1,024 tokens: needs ~" in table


def measure_here(case, shape, repeats=1, device="cpu"):
    """:func:`fastpref.benchmark.measure` without its fresh process (the flow is tested, not the numbers)."""
    return benchmark.measure_in_process(case, shape, repeats, device)


def test_bench_writes_results_before_plotting(tmp_path, monkeypatch, capsys):
    results = tmp_path / "results.json"

    def plot(rows, path, title):
        assert json.loads(results.read_text())["ci"]["rows"][0]["case"] == "gemm_floor"
        assert "## ci\n" in (tmp_path / "report.md").read_text()
        plotted.append(path)

    plotted = []
    monkeypatch.setattr(report, "measure", measure_here)
    monkeypatch.setattr(report, "plot", plot)
    main(["bench", "--sections", "head", "--preset", "ci", "--cases", "gemm_floor", "--repeats", "1",
          "--out", str(tmp_path)])
    assert plotted == [str(tmp_path / "ci.png")]
    assert "| gemm_floor |" in capsys.readouterr().out


def test_bench_without_matplotlib_says_so_first_and_keeps_the_numbers(tmp_path):
    out = run_cli("bench", "--sections", "head", "--preset", "ci", "--cases", "fastpref", "--repeats", "1",
                  "--out", str(tmp_path), blocked_matplotlib=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("note: matplotlib is not installed")
    assert any(line.startswith("| fastpref |") for line in lines)
    rows = json.loads((tmp_path / "results.json").read_text())["ci"]["rows"]
    assert rows[0]["case"] == "fastpref" and rows[0]["time_s"] > 0
    assert not list(tmp_path.glob("*.png"))


def test_demo_without_matplotlib_says_so_first_and_prints_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    monkeypatch.setattr(benchmark, "measure", measure_here)
    main(["demo", "--skip", "step", "training", "--sweep-tokens", "2", "4", "--sweep-d", "8", "--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("note: matplotlib is not installed")
    assert any(line.startswith("| 4 | ") for line in lines)  # tokens | naive | fastpref | ...
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.slow
def test_bench_step_section_writes_the_layout_table_and_plot(tmp_path, monkeypatch, capsys):
    from fastpref import step_benchmark

    asked = []

    def in_process(case, shape, repeats=1, cpu_only=False):
        asked.append(cpu_only)
        return step_benchmark.measure_in_process(case, shape, repeats)

    monkeypatch.setattr(step_benchmark, "measure", in_process)
    main(["bench", "--sections", "step", "--step-preset", "ci", "--step-cases", "padded", "both", "--repeats", "1",
          "--out", str(tmp_path), "--device", "cpu"])
    assert asked == [True, True]  # --device cpu reaches the step section's processes
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "results.json").read_text())["train_step"]["rows"]
    assert [r["case"] for r in rows] == ["padded", "both"]
    assert rows[1]["positions_ratio"] < 1 and rows[1]["loss_delta"] < 1e-4
    assert "| FastPrefDPOTrainer, padding_free + share_prompt |" in out
    assert (tmp_path / "train_step.png").stat().st_size > 0


def test_demo_refuses_a_pair_set_that_cannot_fill_every_step(capsys):
    """``--num-pairs 10 --batch-pairs 8`` trained every other step on 2 pairs (the set is cycled)."""
    with pytest.raises(SystemExit):
        main(["demo", "--num-pairs", "10", "--batch-pairs", "8", "--skip", "memory", "step"])
    assert "argument --num-pairs: must be a multiple of --batch-pairs (8)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, option", [(["--repeats", "-1"], "--repeats"), (["--rounds", "0"], "--rounds")])
def test_step_benchmark_refuses_counts_out_of_range(argv, option, capsys):
    from fastpref import step_benchmark

    with pytest.raises(SystemExit) as exit_:
        step_benchmark.main(argv)
    assert exit_.value.code == 2 and f"argument {option}: must be an integer >=" in capsys.readouterr().err


def test_cpu_only_step_processes_do_not_see_a_gpu(monkeypatch):
    """``bench --device cpu`` ran the step section on CUDA wherever there was a GPU."""
    from fastpref import step_benchmark

    seen = []

    def fake_run(cmd, env, **kwargs):
        seen.append(env.get("CUDA_VISIBLE_DEVICES"))
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps({"case": "padded"}), stderr="")

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(step_benchmark.subprocess, "run", fake_run)
    step_benchmark.measure("padded", step_benchmark.PRESETS["ci"], cpu_only=True)
    step_benchmark.measure("padded", step_benchmark.PRESETS["ci"])
    assert seen == ["", "0"]
