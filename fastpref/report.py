"""``python -m fastpref bench``: the benchmark report of the README (tables, JSON and a PNG per shape).

Runs every case of :mod:`fastpref.benchmark` in its own process, one shape after the other, so the
ratios of one table are measured in one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import asdict

import torch

from .benchmark import CASES, PRESETS, measure, plot, report
from .ops import backends


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastpref bench", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=["target", "target_half_prompt"], choices=sorted(PRESETS))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per case (median); the first gives memory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="out/bench")
    args = parser.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    active = [name for name, ok in backends().items() if ok]
    print(f"fastpref bench on {args.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}); row-kernel backends: {', '.join(active)}")
    results = {}
    for preset in args.preset:
        shape = PRESETS[preset]
        print(f"\n## {preset}: {shape.pairs} pair(s), {shape.response}-token responses, {shape.prompt} prompt tokens, "
              f"d={shape.d}, V={shape.vocab:,}, {shape.dtype}")
        rows = []
        for case in args.cases:
            rows.append(measure(case, shape, repeats=args.repeats, device=args.device))
            print(f"  {case}: " + (f"{rows[-1]['time_s']:.2f} s" if "time_s" in rows[-1] else rows[-1]["error"]),
                  flush=True)
        table = report(rows, shape)
        print(table)
        plot(rows, os.path.join(args.out, f"{preset}.png"), f"{preset}: DPO fwd+bwd at the LM head ({args.device})")
        results[preset] = {"shape": asdict(shape), "rows": rows, "table": table}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {args.out}/results.json and one PNG per preset")


if __name__ == "__main__":
    main()
