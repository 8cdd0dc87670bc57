"""The benchmark report of the README: markdown tables, results.json and plots, measured in one run.

Sections (``--sections``, all by default):

* ``head`` — one DPO step (fwd+bwd) at the LM head for every case of :mod:`fastpref.benchmark`
  (GEMM floor, naive, fastpref recompute / kept, Liger, TRL's fused head) at each ``--preset`` shape;
* ``memory`` — peak memory of one such step against the number of tokens at a Llama-3 head
  (V = 128,256, small ``d``): the materialising paths grow linearly, fastpref stays flat;
* ``step`` — one whole optimizer step of a small Llama through TRL's ``DPOTrainer`` and
  ``FastPrefDPOTrainer`` (padded, padding-free, shared prompt, both): tokens through the backbone,
  time ratios, peak memory, loss.

Every case runs in its own process; the first step of a case is a warm-up that gives its peak memory,
its time is the best of ``--repeats`` warm steps after it. results.json (every row) and report.md (the
tables) are rewritten after every section, and the plots are drawn last, so a failure in one never
loses the numbers.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict

import torch

import fastpref

from . import step_benchmark
from .benchmark import (CASES, PRESETS, SWEEP_CASES, SWEEP_D, SWEEP_TOKENS, memory_sweep, measure,
                        missing_plot_dependency, plot, plot_steps, plot_sweep, report, report_sweep, sweep_shape)
from .cli import even_tokens, int_at_least

SECTIONS = ("head", "memory", "step")


def add_arguments(parser) -> None:
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                        help="what to measure: LM-head cases, memory against tokens, whole training steps")
    parser.add_argument("--preset", nargs="+", default=["target", "target_half_prompt"], choices=sorted(PRESETS),
                        metavar="PRESET",
                        help="head shapes: target = Llama-3-8B head (d=4096, V=128,256), one pair of 1024-token "
                             "responses; target_half_prompt = the same with a 1024-token prompt per row; ci = tiny")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES, metavar="CASE",
                        help=f"head cases to measure: {', '.join(CASES)}")
    parser.add_argument("--repeats", type=int_at_least(1), default=2, metavar="N",
                        help="timed warm steps per case after the warm-up step (the best is reported; the "
                             "warm-up gives the peak memory)")
    parser.add_argument("--sweep-tokens", nargs="+", type=even_tokens, default=list(SWEEP_TOKENS), metavar="N",
                        help="token counts of the memory section (one pair of equal responses each)")
    parser.add_argument("--sweep-d", type=int_at_least(1), default=SWEEP_D, metavar="D",
                        help="hidden size of the memory section (V = 128,256; the logits' size does not depend on d)")
    parser.add_argument("--sweep-cases", nargs="+", default=list(SWEEP_CASES), choices=CASES, metavar="CASE",
                        help="cases of the memory section (same names as --cases)")
    parser.add_argument("--step-preset", default="report", choices=sorted(step_benchmark.PRESETS), metavar="PRESET",
                        help="model and batch of the step section: report = 6-layer Llama, d=512, V=32,000, 8 "
                             "pairs of ~150-token prompts and ~250-token responses (log-normal); demo, ci = smaller")
    parser.add_argument("--step-cases", nargs="+", default=list(step_benchmark.CASES), choices=step_benchmark.CASES,
                        metavar="CASE",
                        help="trainers of the step section: TRL's DPOTrainer, FastPrefDPOTrainer padded, "
                             "padding_free, share_prompt, both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                        help="where the sections run")
    parser.add_argument("--out", default="out/bench", metavar="DIR",
                        help="directory for the tables, results.json and plots")


def head_section(args, results: dict, plots: list) -> None:
    for preset in args.preset:
        shape = PRESETS[preset]
        title = (f"DPO fwd+bwd at the LM head, {shape.pairs} pair(s), {shape.response}-token responses, "
                 f"{shape.prompt} prompt tokens per row, d={shape.d}, V={shape.vocab:,}, {shape.dtype}, {args.device}; "
                 f"time: best of {args.repeats} warm step(s) after a warm-up; memory: the warm-up step")
        print(f"\n## {preset}: {title}")
        rows = []
        for case in args.cases:
            rows.append(measure(case, shape, repeats=args.repeats, device=args.device))
            r = rows[-1]
            print(f"  {case}: " + (f"{r['time_s']:.2f} s (cold first step {r['cold_time_s']:.2f} s)"
                                   if "time_s" in r else r["error"]), flush=True)
        table = report(rows, shape)
        print(f"\n{table}")
        results[preset] = {"title": title, "shape": asdict(shape), "repeats": args.repeats, "rows": rows,
                           "table": table}
        plots.append((plot, rows, os.path.join(args.out, f"{preset}.png"),
                      f"{preset}: DPO fwd+bwd at the LM head ({args.device})"))


def memory_section(args, results: dict, plots: list) -> None:
    vocab = sweep_shape(2).vocab
    title = (f"Peak memory (GiB) of one DPO fwd+bwd beyond its inputs at a Llama-3 head, V={vocab:,}, "
             f"d={args.sweep_d} (small so it runs in minutes; the [N, V] logits do not depend on d), one pair, "
             f"{args.device}; each case in a fresh process")
    print(f"\n## memory_vs_tokens: {title}")
    rows = memory_sweep(args.sweep_cases, args.sweep_tokens, args.sweep_d, args.device)
    table = report_sweep(rows)
    print(f"\n{table}")
    results["memory_vs_tokens"] = {"title": title, "rows": rows, "table": table}
    plots.append((plot_sweep, rows, os.path.join(args.out, "memory_vs_tokens.png"),
                  f"Peak memory of one DPO step (fwd+bwd) at a Llama-3 head, {args.device}\nV={vocab:,}, "
                  f"d={args.sweep_d} (small d keeps the run short; the logits do not depend on d)"))


def step_section(args, results: dict, plots: list) -> None:
    shape = step_benchmark.PRESETS[args.step_preset]
    title = (f"one DPO optimizer step (forward + backward + AdamW), {shape.describe()}; "
             f"{torch.get_num_threads()} threads; time: best of {args.repeats} warm step(s) after a warm-up; "
             f"memory: the warm-up step")
    print(f"\n## train_step: {title}")
    rows = step_benchmark.run(shape, args.step_cases, args.repeats, cpu_only=args.device == "cpu",
                              progress=lambda r: print(f"  {r['case']}: " + (
                                  r["error"] if "error" in r else f"{r['step_time_s']:.2f} s "
                                                                  f"(cold first step {r['cold_time_s']:.2f} s)"),
                                  flush=True))
    table = step_benchmark.table(rows)
    print(f"\n{table}")
    results["train_step"] = {"title": title, "preset": args.step_preset, "shape": asdict(shape),
                             "repeats": args.repeats, "rows": rows, "table": table}
    plots.append((plot_steps, rows, os.path.join(args.out, "train_step.png"),
                  f"One DPO optimizer step ({args.step_preset}), {torch.get_num_threads()} threads\n"
                  f"{shape.describe()}", step_benchmark.LABELS))


def write_results(results: dict, out: str) -> None:
    """``results.json`` (every row) and ``report.md`` (a heading and a table per section)."""
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("".join(f"## {name}\n\n{r['title']}\n\n{r['table']}\n\n" for name, r in results.items()))


def run(args) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        args.parser.error("argument --device: cuda is not available in this process (torch.cuda.is_available() "
                          "is False)")
    os.makedirs(args.out, exist_ok=True)
    missing = missing_plot_dependency()
    if missing:
        print(f"note: {missing}")
    active = [name for name, ok in fastpref.backends().items() if ok]
    print(f"fastpref bench on {args.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}); row-kernel backends: {', '.join(active)}")
    results: dict = {}
    plots: list = []
    sections = {"head": head_section, "memory": memory_section, "step": step_section}
    for name in args.sections:
        sections[name](args, results, plots)
        write_results(results, args.out)
    print(f"\nwrote {args.out}/results.json and {args.out}/report.md")
    if not missing:
        for draw, *plot_args in plots:
            draw(*plot_args)
        print(f"plots in {args.out}/")


def main(argv: list[str] | None = None) -> None:
    """``python -m fastpref bench`` with ``argv`` (the report alone)."""
    from .cli import main as cli_main

    cli_main(["bench", *(argv or [])])
