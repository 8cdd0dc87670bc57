"""The prepared GPU check: proves and times fastpref's CUDA path in one command of a few minutes.

    ./run.sh gpu-check --out DIR               # on the GPU machine (its own python3, PYTHONPATH=.)
    python3 benchmarks/gpu_check.py --out DIR --tune --parts tune     # the tuning sweep alone
    python benchmarks/gpu_check.py --dry --out DIR                    # the same code on CPU (the test suite)

Parts, in order (``--parts``); each reports into ``DIR/results.json`` and ``DIR/results.md`` as soon as it
ends, and the next one runs whatever happened:

* ``env`` — versions, the GPU, which peers import;
* ``correctness`` — the Triton backend compiled on CUDA against the fp64 oracle
  (``fastpref.ops.reference.reference_token_stats``): fp32 / bf16 / fp16, V not a multiple of the
  kernel block, every statistic on and off, soft-cap, kept / partly kept / recomputed / frozen head,
  ``sequence_logps`` and ``preference_loss``, a chunk of one row at V = 128k, N·V > 2**31 (int64
  offsets) and the target shape in bf16;
* ``tests`` — the unit tests of the backends on the device (``FASTPREF_TEST_DEVICE=cuda``);
* ``bench`` — one fwd+bwd at the LM head, M = 8,192 tokens, d = 4,096, V = 128,256, bf16: cuBLAS 3- and
  4-GEMM floors, the naive path, fastpref recompute / keep / with entropy, and the peers (TRL's fused
  head, Liger-Kernel, Cut Cross-Entropy, ``torch.nn.functional.linear_cross_entropy``);
* ``trainer`` — one step of a 2-layer Llama-3-8B-shaped model, ``FastPrefDPOTrainer`` vs TRL's own
  ``DPOTrainer`` (``benchmarks/trl_memory.py``);
* ``tune`` (``--tune``) — chunk rows, and the kernels' BLOCK / num_warps where fastpref exposes them.

Every part but ``tests`` runs its cases in a worker process that logs each case as it starts and ends;
a case that crashes the process (a CUDA fault) or outruns its time limit is recorded as such and a
fresh worker goes on with the next case. Peers travel as wheels in ``.whl/``
(``benchmarks/fetch_gpu_wheels.py``); they are installed with ``pip --target`` into a temporary folder
that the workers get on ``PYTHONPATH``.

Accuracy bounds checked (the README's, with an absolute floor of 2·2⁻⁸ for logits near 0): fp32 statistics and gradients within 1e-5 norm-wise relative
error of fp64; bf16 / fp16 statistics within ``2·2⁻⁸·(max|z| + 1)`` absolute (z: the logits the softmax
sees), gradients within 3e-2 norm-wise relative; ``is_top1`` may differ on near-ties (≤ 1 token in
fp32, ≤ 2% in half precision).
"""


from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _path in (str(REPO), str(Path(__file__).resolve().parent)):  # fastpref from this checkout; gpu_check_parts, trl_memory
    if _path not in sys.path:
        sys.path.insert(0, _path)

from gpu_check_parts.config import (  # noqa: E402
    DEFAULT_PARTS, FASTPREF_IMPORT_ERROR, PART_BUDGET_S, PARTS, Skip, dry_config, gpu_config)
from gpu_check_parts.correctness import (  # noqa: E402
    ALL_STATS, DIFFERENTIABLE, DRY_CORRECTNESS, HALF_STAT_BOUND, checks_result, compare, oracle, random_head,
    random_labels, upstream)
from gpu_check_parts.env import WHEEL_DIR, install_wheels  # noqa: E402
from gpu_check_parts.head import HEAD_CASES, head_batch, head_shape, measure_head  # noqa: E402
from gpu_check_parts.report import finite, summary, write_reports  # noqa: E402
from gpu_check_parts.runner import Context, run_part, run_tests, worker  # noqa: E402

# What benchmarks/test_bench_gpu.py and tests/test_gpu_check.py import from here.
__all__ = ["ALL_STATS", "DIFFERENTIABLE", "DRY_CORRECTNESS", "HALF_STAT_BOUND", "HEAD_CASES", "Skip", "checks_result",
           "compare", "gpu_config", "head_batch", "head_shape", "main", "measure_head", "oracle", "random_head",
           "random_labels", "upstream"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "gpu-check", help="results folder")
    parser.add_argument("--dry", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--parts", help=f"comma-separated, from {','.join(PARTS)} (default: {','.join(DEFAULT_PARTS)})")
    parser.add_argument("--tune", action="store_true", help="add the tuning sweep (part tune)")
    parser.add_argument("--budget-s", type=float, default=345.0, help="stop starting work after this many seconds")
    parser.add_argument("--wheels", type=Path, help="peer wheels to install (default: .whl/; none with --dry)")
    parser.add_argument("--time-limit", action="append", default=[], metavar="[CASE=]SECONDS",
                        help="cap the time limit of one case, or of every case")
    parser.add_argument("--fault", action="append", default=[], help=argparse.SUPPRESS)  # CASE=crash|hang
    parser.add_argument("--worker", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--skip", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = dry_config() if args.dry else gpu_config()
    if args.wheels is None and not args.dry:
        args.wheels = WHEEL_DIR
    faults = dict(f.split("=", 1) for f in args.fault)
    if args.worker:
        return worker(args.worker, cfg, args.work, set(args.skip), faults)

    parts = args.parts.split(",") if args.parts else list(DEFAULT_PARTS)
    if args.tune and "tune" not in parts:
        parts.append("tune")
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}: choose from {PARTS}")
    if "env" not in parts:
        parts.insert(0, "env")
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "check.log").write_text("")
    ctx = Context(out=args.out, work=Path(tempfile.mkdtemp(prefix="fastpref-gpu-check-")), env={},
                  deadline=start + args.budget_s, faults=faults,
                  time_limits={k: float(v) for k, _, v in (t.rpartition("=") for t in args.time_limit)})
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry": cfg.dry, "budget_s": args.budget_s,
               "out": str(args.out), "config": finite(asdict(cfg)), "fastpref_import_error": FASTPREF_IMPORT_ERROR,
               "parts": {}}
    ctx.log(f"fastpref GPU check{' --dry' if cfg.dry else ''}: parts {', '.join(parts)}; budget {args.budget_s:.0f} s")
    results["wheels"] = install_wheels(args.wheels, ctx.log) if args.wheels else {"status": "none"}
    ctx.log(f"wheels: {results['wheels']['status']} ({results['wheels'].get('seconds', 0)} s)")
    path = [str(REPO)] + ([results["wheels"]["site"]] if results["wheels"].get("status") in ("ok", "partial") else [])
    ctx.env = {**os.environ, "PYTHONPATH": os.pathsep.join(path + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if cfg.dry:  # CPU tensors through the Triton interpreter, even on a machine with a GPU
        ctx.env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    for part in parts:
        left = ctx.deadline - time.time()
        if left < 5:
            results["parts"][part] = {"status": "not run", "seconds": 0, "budget_s": 0, "cases": [],
                                      "error": "global time budget used up"}
        else:
            ctx.log(f"== {part} (up to {min(PART_BUDGET_S[part], left):.0f} s)")
            try:
                results["parts"][part] = run_tests(cfg, ctx) if part == "tests" else run_part(part, cfg, ctx)
            except Exception as error:  # noqa: BLE001 - the report must still be written
                results["parts"][part] = {"status": "error", "error": traceback.format_exc()[-2000:], "cases": []}
                ctx.log(f"{part}: {error}")
            ctx.log(f"== {part}: {results['parts'][part]['status']} ({results['parts'][part].get('seconds', 0)} s)")
        results["elapsed_s"] = round(time.time() - start, 1)
        write_reports(args.out, results)
    ctx.log(summary(results))
    shutil.rmtree(ctx.work, ignore_errors=True)
    if results["wheels"].get("site"):
        shutil.rmtree(results["wheels"]["site"], ignore_errors=True)
    return 0 if all(p["status"] in ("ok", "partial") for p in results["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
