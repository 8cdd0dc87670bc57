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

Accuracy bounds checked (the README's): fp32 statistics and gradients within 1e-5 norm-wise relative
error of fp64; bf16 / fp16 statistics within ``2·2⁻⁸·(max|z| + 1)`` absolute (z: the logits the softmax
sees), gradients within 3e-2 norm-wise relative; ``is_top1`` may differ on near-ties (≤ 1 token in
fp32, ≤ 2% in half precision).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
for _path in (str(REPO), str(Path(__file__).resolve().parent)):  # fastpref from this checkout; trl_memory
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

try:  # the parent only schedules and reports: it runs (and says why) even when fastpref cannot load here
    import fastpref
    from fastpref import benchmark as head_bench
    from fastpref.ops.reference import reference_token_stats
except Exception as _error:  # noqa: BLE001
    fastpref = head_bench = reference_token_stats = None
    FASTPREF_IMPORT_ERROR = f"{type(_error).__name__}: {_error}"
else:
    FASTPREF_IMPORT_ERROR = None

GiB = 2**30
PARTS = ("env", "correctness", "tests", "bench", "trainer", "tune")
DEFAULT_PARTS = ("env", "correctness", "bench", "tests", "trainer")
# Per-part caps in seconds (a part also stops at the global --budget-s deadline).
PART_BUDGET_S = {"env": 60, "correctness": 90, "bench": 130, "tests": 80, "trainer": 100, "tune": 300}
UNIT_TEST_FILES = ("tests/test_backends.py", "tests/test_triton.py", "tests/test_token_stats.py")
DRY_TESTS_SELECT = "shift_labels or empty_chunk"  # a few quick unit tests for --dry
WHEEL_DIR = REPO / ".whl"

FP32_TOL = 1e-5
HALF_STAT_BOUND = 2 * 2**-8  # times (max|z| + 1)
HALF_GRAD_TOL = 3e-2
STAT_NAMES = fastpref.TokenStats._fields if fastpref else ()
DIFFERENTIABLE = ("logp", "entropy", "kl")
ALL_STATS = dict(entropy=True, kl=True, ref_entropy=True, log_sum_sq_probs=True, mean_logits=True, is_top1=True)
SOFTCAP = dict(softcap=5.0, logit_scale=1.3, temperature=0.7)
KEEP_ALL = 1 << 62  # a logits budget that keeps every chunk

# Targets at the benchmark shape on an H200 (issue 12): fwd+bwd milliseconds, GiB beyond grad_W + grad_hidden.
TARGETS = {"fastpref": {"ms": 45.0, "beyond_grads_GiB": 1.0}, "fastpref_keep": {"ms": 37.0}}


@dataclass(frozen=True)
class Config:
    """Shapes and repetitions of one mode: the GPU check, or ``--dry`` (CPU, Triton interpreter, tiny)."""

    dry: bool
    device: str
    head: dict  # the benchmark / tuning shape: fastpref.benchmark.Shape(**head)
    sweep: tuple[int, int, int, int]  # (rows, seq, d, V) of the small cases; V > the kernel block, not a multiple
    chunk: int  # rows per chunk in the small cases: several chunks, the last one short
    large: tuple[int, int, int]  # (tokens, d, V) of the bf16 bounds at full size
    int64: tuple[int, int, int]  # (rows, d, V) of the one-chunk N·V > 2**31 case
    one_row_vocab: int
    reps: int
    warmup: int
    trainer: dict
    tune_chunks: tuple[int, ...]
    tune_kernels: tuple[tuple[int, int], ...]  # (BLOCK, num_warps)


def gpu_config() -> Config:
    vocab = 128_256
    return Config(
        dry=False, device="cuda",
        head=dict(pairs=4, response=1024, prompt=0, d=4096, vocab=vocab, dtype="bfloat16"),
        sweep=(3, 8, 64, 5003), chunk=5,
        large=(8192, 4096, vocab), int64=(2**31 // vocab + 65, 64, vocab), one_row_vocab=vocab,
        reps=10, warmup=2,
        trainer=dict(layers=2, pairs=4, prompt=512, completion=512, dtype="bfloat16", device="cuda",
                     hidden=4096, vocab=vocab, intermediate=14336),
        tune_chunks=(512, 1024, 2048, 4096, 8192),
        tune_kernels=tuple((b, w) for b in (1024, 2048, 4096, 8192) for w in (4, 8, 16)),
    )


def dry_config() -> Config:
    return Config(
        dry=True, device="cpu",
        head=dict(pairs=1, response=32, prompt=16, d=64, vocab=2048, dtype="float32"),
        sweep=(2, 5, 16, 4099), chunk=2, large=(6, 32, 1000), int64=(8, 16, 300), one_row_vocab=4099,
        reps=2, warmup=1,
        trainer=dict(layers=2, pairs=1, prompt=8, completion=8, dtype="float32", device="cpu",
                     hidden=64, vocab=512, intermediate=128),
        tune_chunks=(64, 128), tune_kernels=((1024, 4),),
    )


# ============================================================================================ case machinery


class Skip(Exception):
    """A case that cannot run here (a peer not installed, CUDA-only code in --dry)."""


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Config], dict]
    timeout_s: float = 60.0


def check(what: str, value: float, bound: float) -> dict:
    """One accuracy check: ``value <= bound`` (NaN fails)."""
    return {"what": what, "value": float(value), "bound": float(bound), "ok": bool(value <= bound)}


def checks_result(checks: list[dict], **extra) -> dict:
    worst = max(checks, key=lambda c: math.inf if not c["ok"] else c["value"] / c["bound"] if c["bound"] else 0)
    return {"status": "ok" if all(c["ok"] for c in checks) else "failed", "checks": checks,
            "worst": f"{worst['what']}: {worst['value']:.3g} (bound {worst['bound']:.3g})", **extra}


def _emit(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(_finite(record)) + "\n")


def _finite(x):
    """JSON without NaN/Infinity (strict parsers reject them)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


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
        _free_device_memory()
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
        cmd = [sys.executable, __file__, "--worker", part, "--work", str(work_file)] + (["--dry"] if cfg.dry else [])
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


# ================================================================================= environment and wheels


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def install_wheels(folder: Path, log: Callable[[str], None]) -> dict:
    """``pip install --no-index --no-deps --target <tmp>`` of every wheel in ``folder``; lists the
    requirements of those wheels that nothing installed satisfies (what to fetch next time)."""
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        return {"status": "none", "note": f"no wheels in {folder}: peers come from this environment"}
    site = tempfile.mkdtemp(prefix="fastpref-gpu-site-")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--disable-pip-version-check", "--target", site, *map(str, wheels)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    failed = {}
    if done.returncode != 0:  # pip installs all or nothing: then one at a time, to keep what works
        log(done.stdout + done.stderr)
        for wheel in wheels:
            one = subprocess.run(cmd[:-len(wheels)] + [str(wheel)], capture_output=True, text=True, timeout=120)
            if one.returncode != 0:
                failed[wheel.name] = (one.stderr or one.stdout).strip()[-500:]
    info = {"folder": str(folder), "site": site, "wheels": [w.name for w in wheels if w.name not in failed],
            "seconds": round(time.perf_counter() - start, 1)}
    if failed:
        info["failed"] = failed
    status = "ok" if not failed else "partial" if len(failed) < len(wheels) else "failed"
    return {**info, "status": status, "unmet_requirements": unmet_requirements(site)}


def unmet_requirements(site: str) -> list[str]:
    """Requirements (no extras) of the distributions in ``site`` that neither it nor this Python satisfies."""
    from importlib import metadata

    from packaging.requirements import Requirement

    installed = {}
    for dist in metadata.distributions(path=[site] + sys.path):
        installed.setdefault(_normalise(dist.metadata["Name"]), dist.version)
    unmet = []
    for dist in metadata.distributions(path=[site]):
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = installed.get(_normalise(req.name))
            if have is None:
                unmet.append(f"{dist.metadata['Name']} needs {req} (not installed)")
            elif req.specifier and not req.specifier.contains(have, prereleases=True):
                unmet.append(f"{dist.metadata['Name']} needs {req} (have {have})")
    return unmet


PEER_MODULES = {"trl": "trl", "liger-kernel": "liger_kernel", "cut-cross-entropy": "cut_cross_entropy",
                "datasets": "datasets", "accelerate": "accelerate", "transformers": "transformers", "peft": "peft"}


def environment(cfg: Config) -> dict:
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": version("triton"), "fastpref_backends": fastpref.backends(),
            "torch_linear_cross_entropy": hasattr(torch.nn.functional, "linear_cross_entropy"),
            "allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    peers = {}
    for dist, module in PEER_MODULES.items():
        try:
            if importlib.util.find_spec(module) is None:
                raise ImportError(f"no module {module}")
            if not cfg.dry:  # --dry only looks: importing them all takes seconds on a small CPU
                importlib.import_module(module)
            peers[dist] = version(dist) or "?"
        except Exception as error:  # noqa: BLE001 - a broken peer is a finding, not a crash
            peers[dist] = f"not importable: {type(error).__name__}: {str(error)[:200]}"
    info["peers"] = peers
    site = next((p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if "fastpref-gpu-site-" in p), None)
    if site:
        info["from_wheels"] = {d.metadata["Name"]: d.version for d in metadata.distributions(path=[site])}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sm_count=props.multi_processor_count,
                    gpu_memory_GiB=round(props.total_memory / GiB, 1),
                    capability=f"{props.major}.{props.minor}")
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    elif not cfg.dry:
        return {"status": "failed", "error": "no CUDA device visible (use --dry on a machine without a GPU)", **info}
    return info


# ======================================================================== part 1: correctness vs fp64 oracle


def random_head(n: int, seq: int, d: int, vocab: int, *, dtype: torch.dtype, device: str, bias: bool = False,
                ref: bool = False, seed: int = 0) -> dict:
    """hidden [n, seq, d], weight [V, d] (O(1)-O(10) logits), optional bias and a nearby reference head."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=g)

    hidden = randn(n, seq, d)
    weight = randn(vocab, d) * (3 / d**0.5)
    head = {"hidden": hidden, "weight": weight}
    if bias:
        head["bias"] = randn(vocab) * 0.5
    if ref:
        head["ref_hidden"] = hidden + 0.3 * randn(n, seq, d)
        head["ref_weight"] = weight + (0.1 / d**0.5) * randn(vocab, d)
    return {k: v.to(dtype) for k, v in head.items()}


def random_labels(n: int, seq: int, vocab: int, *, device: str, prompt: int = 0, pad=(), seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed + 1)
    labels = torch.randint(0, vocab, (n, seq), device=device, generator=g)
    labels[:, :prompt] = -100
    for row, p in enumerate(pad):
        if p:
            labels[row, seq - p:] = -100
    return labels


def upstream(labels: torch.Tensor, names, seed: int = 3) -> dict:
    """Random fp64 upstream gradients for the differentiable statistics (zero where ignored)."""
    g = torch.Generator(device=labels.device).manual_seed(seed)
    valid = labels != -100
    return {k: torch.randn(labels.shape, device=labels.device, generator=g, dtype=torch.float64) * valid
            for k in names}


def _stat_options(options: dict) -> dict:
    return {k: v for k, v in options.items() if k not in ("logits_budget", "chunk_size", "backend")}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: a norm-wise relative error."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def fused(head: dict, labels: torch.Tensor, up: dict, *, frozen: bool = False, **options):
    """fastpref.token_stats on the Triton backend; flattened stats and the gradients of sum(up * stat)."""
    leaves = {k: v.detach().clone().requires_grad_(k == "hidden" or (not frozen and k in ("weight", "bias")))
              for k, v in head.items()}
    stats = fastpref.token_stats(labels=labels, backend="triton", **leaves, **options)
    loss = sum((getattr(stats, k).double() * g).sum() for k, g in up.items() if getattr(stats, k) is not None)
    names = [k for k, v in leaves.items() if v.requires_grad]
    grads = dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names])))
    flat = {k: None if v is None else v.reshape(-1) for k, v in stats._asdict().items()}
    return flat, {k: v.reshape(-1, v.shape[-1]) if k == "hidden" else v for k, v in grads.items()}


def oracle(head: dict, labels: torch.Tensor, up: dict, *, frozen: bool = False, rows: torch.Tensor | None = None,
           block: int = 2048, **options) -> dict:
    """fp64 materialising oracle over blocks of tokens (the loss is a sum over tokens, so grad_W adds up).

    ``rows``: only these flattened tokens (their upstream gradient must hold all of it). Returns
    ``{"stats", "grads", "zmax"}``: zmax = max|z| over the valid tokens, z the logits the softmax sees
    before any soft-cap (the scale of a low-precision rounding error).
    """
    options = _stat_options(options)
    d = head["hidden"].shape[-1]
    flat = {k: v.reshape(-1, d) if k in ("hidden", "ref_hidden") else v for k, v in head.items()}
    y = labels.reshape(-1)
    g = {k: v.reshape(-1) for k, v in up.items()}
    index = torch.arange(y.numel(), device=y.device) if rows is None else rows
    shared = {k: flat[k].detach().double().requires_grad_(not frozen and k in ("weight", "bias"))
              for k in ("weight", "bias", "ref_weight") if k in flat}
    stats: dict[str, list] = {k: [] for k in STAT_NAMES}
    grad_h, grads, zmax = [], {k: None for k, v in shared.items() if v.requires_grad}, 0.0
    scale = options.get("logit_scale", 1.0) / options.get("temperature", 1.0)
    for s in range(0, index.numel(), block):
        idx = index[s:s + block]
        h = flat["hidden"].index_select(0, idx).detach().double().requires_grad_(True)
        extra = {"ref_hidden": flat["ref_hidden"].index_select(0, idx).double()} if "ref_hidden" in flat else {}
        out = reference_token_stats(h, shared["weight"], y[idx], bias=shared.get("bias"),
                                    ref_weight=shared.get("ref_weight"),
                                    compute_dtype=torch.float64, **extra, **options)
        loss = sum((getattr(out, k) * g[k][idx]).sum() for k in g if getattr(out, k) is not None)
        targets = [h] + [shared[k] for k in grads]
        if isinstance(loss, torch.Tensor):
            got = torch.autograd.grad(loss, targets)
        else:  # no upstream gradient: statistics only
            got = [torch.zeros_like(t) for t in targets]
        grad_h.append(got[0])
        for k, v in zip(grads, got[1:]):
            grads[k] = v if grads[k] is None else grads[k] + v
        for k in STAT_NAMES:
            x = getattr(out, k)
            stats[k].append(None if x is None else x.detach())
        with torch.no_grad():
            z = h @ shared["weight"].T + (shared["bias"] if "bias" in shared else 0)
            live = (y[idx] != -100)[:, None]
            zmax = max(zmax, (z.abs() * live).max().item() * scale)
            del z
    stats_cat = {k: None if v[0] is None else torch.cat(v) for k, v in stats.items()}
    return {"stats": stats_cat, "grads": {"hidden": torch.cat(grad_h), **grads}, "zmax": zmax + 1.0}


def compare(got_stats: dict, got_grads: dict, want: dict, labels: torch.Tensor, dtype: torch.dtype, *,
            rows: torch.Tensor | None = None, prefix: str = "") -> list[dict]:
    """Checks of fused stats / gradients against the oracle (``rows``: the oracle's subset of tokens)."""
    y = labels.reshape(-1)
    index = torch.arange(y.numel(), device=y.device) if rows is None else rows
    valid = y[index] != -100
    half = dtype != torch.float32
    stat_bound = HALF_STAT_BOUND * want["zmax"]
    out = [check(prefix + "statistics returned == asked",
                 sum((got_stats[k] is None) != (want["stats"][k] is None) for k in STAT_NAMES), 0)]
    for name in STAT_NAMES:
        got, ref = got_stats[name], want["stats"][name]
        if got is None or ref is None:
            continue
        out.append(check(prefix + f"{name} zero where ignored", got[y == -100].double().abs().sum().item(), 0))
        got = got[index]
        if name == "is_top1":
            out.append(check(prefix + "is_top1 mismatches", (got != ref).sum().item(),
                             max(1, int(0.02 * valid.sum().item())) if half else 1))
        elif half:
            out.append(check(prefix + f"{name} max abs err", (got.double() - ref).abs().max().item(), stat_bound))
        else:
            out.append(check(prefix + f"{name} rel err", rel_err(got, ref), FP32_TOL))
    for name, ref in want["grads"].items():
        got = got_grads[name]
        out.append(check(prefix + f"grad_{name} dtype is {dtype}".replace("torch.", ""), int(got.dtype != dtype), 0))
        sub = got[index] if name == "hidden" else got
        out.append(check(prefix + f"grad_{name} rel err", rel_err(sub, ref), HALF_GRAD_TOL if half else FP32_TOL))
    if rows is not None:  # every other token had a zero upstream gradient: its grad_hidden row must be exactly 0
        others = torch.ones(y.numel(), dtype=torch.bool, device=y.device)
        others[index] = False
        out.append(check(prefix + "grad_hidden zero outside the checked tokens",
                         got_grads["hidden"][others].double().abs().max().item() if others.any() else 0.0, 0))
    return out


HEAD_MODES = ("recompute", "keep", "partly kept", "frozen")


def _budget(mode: str, chunk_rows: int, vocab: int, dtype: torch.dtype, kl: bool) -> int:
    """The logits budget of a head mode (``partly kept``: exactly the first chunk's logits)."""
    per_row = vocab * torch.tensor([], dtype=dtype).element_size() * (2 if kl else 1)
    return {"recompute": 0, "frozen": 0, "keep": KEEP_ALL, "partly kept": chunk_rows * per_row}[mode]


def sweep_case(dtype_name: str, mode: str, stats_on: str, transform: str) -> Callable[[Config], dict]:
    def run(cfg: Config) -> dict:
        dtype = getattr(torch, dtype_name)
        n, seq, d, vocab = cfg.sweep
        full = stats_on == "all"
        head = random_head(n, seq, d, vocab, dtype=dtype, device=cfg.device, bias=full, ref=full, seed=11)
        labels = random_labels(n, seq, vocab, device=cfg.device, prompt=2, pad=(1, 0, 2)[:n])
        stats = ALL_STATS if full else {}
        options = dict(stats, **(SOFTCAP if transform == "softcap" else {}))
        up = upstream(labels, DIFFERENTIABLE if full else ("logp",))
        budget = _budget(mode, cfg.chunk, vocab, dtype, full)
        got, grads = fused(head, labels, up, frozen=mode == "frozen", logits_budget=budget, chunk_size=cfg.chunk,
                           **options)
        want = oracle(head, labels, up, frozen=mode == "frozen", **options)
        return checks_result(compare(got, grads, want, labels, dtype), vocab=vocab,
                             valid_tokens=int((labels != -100).sum()))

    return run


def sequence_case(dtype_name: str) -> Callable[[Config], dict]:
    """sequence_logps: per-row sums, means and counts of the fused log-probs vs the oracle's."""

    def run(cfg: Config) -> dict:
        dtype = getattr(torch, dtype_name)
        _, seq, d, vocab = cfg.sweep
        head = random_head(4, seq, d, vocab, dtype=dtype, device=cfg.device, seed=21)
        labels = random_labels(4, seq, vocab, device=cfg.device, prompt=2, pad=(0, 1, 2, 0))
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in head.items()}
        out = fastpref.sequence_logps(leaves["hidden"], leaves["weight"], labels, backend="triton",
                                      chunk_size=cfg.chunk)
        g = torch.Generator(cfg.device).manual_seed(5)
        coef = torch.randn(2, 4, device=cfg.device, dtype=torch.float64, generator=g)
        loss = (coef[0] * out.sum_logp.double()).sum() + (coef[1] * out.mean_logp.double()).sum()
        grads = torch.autograd.grad(loss, [leaves["hidden"], leaves["weight"]])
        # The oracle: sum(a_i sum_t logp + b_i mean_t logp) = sum_t (a_i + b_i / n_i) logp_t per row i.
        valid = labels != -100
        count = valid.sum(-1)
        up = {"logp": ((coef[0] + coef[1] / count)[:, None] * valid).double()}
        want = oracle(head, labels, up)
        logp = want["stats"]["logp"].view(labels.shape)
        sums, half = logp.sum(-1), dtype != torch.float32
        bound = HALF_STAT_BOUND * want["zmax"] * count.max().item()
        checks = [check("num_tokens exact", (out.num_tokens.cpu() != count.cpu()).sum().item(), 0)]
        if half:
            checks += [check("sum_logp max abs err", (out.sum_logp.double() - sums).abs().max().item(), bound),
                       check("mean_logp max abs err", (out.mean_logp.double() - sums / count).abs().max().item(),
                             HALF_STAT_BOUND * want["zmax"])]
        else:
            checks += [check("sum_logp rel err", rel_err(out.sum_logp, sums), FP32_TOL),
                       check("mean_logp rel err", rel_err(out.mean_logp, sums / count), FP32_TOL)]
        tol = HALF_GRAD_TOL if half else FP32_TOL
        checks += [check("grad_hidden rel err", rel_err(grads[0].reshape(-1, d), want["grads"]["hidden"]), tol),
                   check("grad_weight rel err", rel_err(grads[1], want["grads"]["weight"]), tol)]
        return checks_result(checks)

    return run


def dpo_formula(chosen, rejected, ref_chosen, ref_rejected, beta):
    """Sigmoid DPO written out: mean_i -log sigmoid(beta ((c_i - rc_i) - (r_i - rr_i)))."""
    return -torch.nn.functional.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()


def preference_case(dtype_name: str, reference: str) -> Callable[[Config], dict]:
    """preference_loss("dpo") with precomputed reference log-probs or a reference head in the same pass."""

    def run(cfg: Config) -> dict:
        dtype = getattr(torch, dtype_name)
        _, seq, d, vocab = cfg.sweep
        pairs, beta = 2, 0.1
        head = random_head(2 * pairs, seq, d, vocab, dtype=dtype, device=cfg.device, ref=reference == "head", seed=31)
        labels = random_labels(2 * pairs, seq, vocab, device=cfg.device, prompt=2, pad=(1, 0, 2, 0))
        valid = labels != -100
        policy = {k: head[k].detach().clone().requires_grad_(True) for k in ("hidden", "weight")}
        kwargs = {}
        g = torch.Generator(cfg.device).manual_seed(9)
        if reference == "head":
            kwargs = {"ref_hidden": head["ref_hidden"], "ref_weight": head["ref_weight"]}
            ref_head = {"hidden": head["ref_hidden"], "weight": head["ref_weight"]}
            ref_oracle = oracle(ref_head, labels, {})
            ref_sums = ref_oracle["stats"]["logp"].view(labels.shape).sum(-1)
        else:
            ref_sums = -torch.rand(2 * pairs, device=cfg.device, generator=g, dtype=torch.float64) * seq * 3
            kwargs = {"ref_chosen_logps": ref_sums[:pairs].float(), "ref_rejected_logps": ref_sums[pairs:].float()}
        out = fastpref.preference_loss(policy["hidden"], policy["weight"], labels, loss="dpo", beta=beta,
                                       backend="triton", chunk_size=cfg.chunk, **kwargs)
        grads = torch.autograd.grad(out.loss, [policy["hidden"], policy["weight"]])
        # fp64 oracle: the formula on oracle sums, its gradient through the oracle's token log-probs.
        h64 = policy["hidden"].detach().double().requires_grad_(True)
        w64 = policy["weight"].detach().double().requires_grad_(True)
        logp = reference_token_stats(h64, w64, labels, compute_dtype=torch.float64).logp
        sums = logp.sum(-1)
        want = dpo_formula(sums[:pairs], sums[pairs:], ref_sums[:pairs], ref_sums[pairs:], beta)
        want_grads = torch.autograd.grad(want, [h64, w64])
        zmax = (h64.detach() @ w64.detach().T).abs().max().item() + 1
        if reference == "head":
            zmax = max(zmax, ref_oracle["zmax"])
        half = dtype != torch.float32
        # |d loss / d margin| <= 1: the margin's error is beta times four sums' errors at most.
        loss_bound = beta * 4 * HALF_STAT_BOUND * zmax * valid.sum(-1).max().item() if half else FP32_TOL
        loss_err = abs(out.loss.item() - want.item()) / (1 if half else abs(want.item()))
        tol = HALF_GRAD_TOL if half else FP32_TOL
        margins = beta * ((sums[:pairs] - ref_sums[:pairs]) - (sums[pairs:] - ref_sums[pairs:]))
        margin_err = (out.metrics["rewards/margins"].double() - margins.mean()).abs().item()
        checks = [check("loss " + ("abs" if half else "rel") + " err", loss_err, loss_bound),
                  check("rewards/margins abs err", margin_err,
                        loss_bound if half else FP32_TOL * max(1, margins.abs().max().item())),
                  check("grad_hidden rel err", rel_err(grads[0], want_grads[0]), tol),
                  check("grad_weight rel err", rel_err(grads[1], want_grads[1]), tol)]
        return checks_result(checks, loss=out.loss.item())

    return run


def one_row_chunks_case(dtype_name: str, mode: str) -> Callable[[Config], dict]:
    """chunk_size=1 at a Llama-3 vocabulary: one-row GEMMs and launches, every statistic, reference head."""

    def run(cfg: Config) -> dict:
        dtype = getattr(torch, dtype_name)
        vocab = cfg.one_row_vocab
        n, seq, d, _ = cfg.sweep
        head = random_head(n, seq, d, vocab, dtype=dtype, device=cfg.device, bias=True, ref=True, seed=41)
        labels = random_labels(n, seq, vocab, device=cfg.device, prompt=2, pad=(2, 0, 1)[:n])
        up = upstream(labels, DIFFERENTIABLE)
        budget = _budget(mode, 1, vocab, dtype, True)
        got, grads = fused(head, labels, up, logits_budget=budget, chunk_size=1, **ALL_STATS)
        want = oracle(head, labels, up, **ALL_STATS)
        return checks_result(compare(got, grads, want, labels, dtype), vocab=vocab)

    return run


def int64_case(mode: str) -> Callable[[Config], dict]:
    """One chunk of N·V > 2**31 bf16 logits (policy and reference): the kernels' row offsets need int64.

    The oracle runs on tokens at the start, on both sides of the 2**31-element boundary and at the end;
    every other token gets a zero upstream gradient, so grad_W is the oracle's and their grad_hidden is 0.
    """

    def run(cfg: Config) -> dict:
        rows, d, vocab = cfg.int64
        dtype = torch.bfloat16
        head = random_head(1, rows, d, vocab, dtype=dtype, device=cfg.device, ref=True, seed=51)
        labels = random_labels(1, rows, vocab, device=cfg.device)
        boundary = 2**31 // vocab
        picks = {*range(0, 16), *range(boundary - 16, boundary + 16), *range(rows - 16, rows)}
        index = torch.tensor(sorted(i for i in picks if 0 <= i < rows), device=cfg.device)
        mask = torch.zeros(labels.numel(), dtype=torch.bool, device=cfg.device)
        mask[index] = True
        up = {k: v * mask.view(labels.shape) for k, v in upstream(labels, DIFFERENTIABLE).items()}
        options = dict(entropy=True, kl=True, ref_entropy=True)
        budget = 0 if mode == "recompute" else KEEP_ALL
        got, grads = fused(head, labels, up, logits_budget=budget, chunk_size=rows, **options)
        finite = sum(int(not torch.isfinite(v).all()) for k, v in got.items() if v is not None and k != "is_top1")
        want = oracle(head, labels, up, rows=index, **options)
        checks = [check("non-finite statistics", finite, 0)] + compare(got, grads, want, labels, dtype, rows=index)
        return checks_result(checks, elements=rows * vocab, int64_exercised=rows * vocab > 2**31)

    return run


def large_case(cfg: Config) -> dict:
    """The target shape in bf16: logp + entropy, recompute and keep, against one blocked fp64 oracle."""
    tokens, d, vocab = cfg.large
    dtype = torch.bfloat16
    head = random_head(1, tokens, d, vocab, dtype=dtype, device=cfg.device, seed=61)
    labels = random_labels(1, tokens, vocab, device=cfg.device)
    up = upstream(labels, ("logp", "entropy"))
    want = oracle(head, labels, up, entropy=True)
    checks = []
    for mode, budget in (("recompute", 0), ("keep", KEEP_ALL)):
        got, grads = fused(head, labels, up, logits_budget=budget, entropy=True)
        checks += compare(got, grads, want, labels, dtype, prefix=f"{mode}: ")
        del got, grads
        _free_device_memory()
    return checks_result(checks, shape=f"M={tokens}, d={d}, V={vocab}", zmax=want["zmax"])


# --dry runs one case of each kind (the interpreter is slow); the GPU runs them all.
DRY_CORRECTNESS = ("oracle float32 recompute all softcap", "oracle float32 partly kept all plain",
                   "oracle bfloat16 frozen all softcap", "oracle bfloat16 keep logp plain", "sequence_logps float32",
                   "preference_loss dpo bfloat16 ref head", "chunk of one row", "N*V > 2^31 bf16 keep",
                   "target shape bf16 bounds")


def correctness_cases(cfg: Config) -> list[Case]:
    # The full-size cases first: they need a GPU most, and the sweep's many small compiles come after.
    cases = [Case("target shape bf16 bounds", large_case, 120)]
    cases += [Case(f"N*V > 2^31 bf16 {mode}", int64_case(mode), 120) for mode in ("keep", "recompute")]
    cases += [Case(f"chunk of one row V={cfg.one_row_vocab} {dt} {mode}", one_row_chunks_case(dt, mode))
              for dt in ("float32", "bfloat16") for mode in ("recompute", "keep")]
    cases += [Case(f"preference_loss dpo {dt} ref {ref}", preference_case(dt, ref))
              for dt in ("float32", "bfloat16") for ref in ("precomputed", "head")]
    cases += [Case(f"sequence_logps {dt}", sequence_case(dt)) for dt in ("float32", "bfloat16")]
    cases += [Case(f"oracle {dt} {mode} {stats} {tf}", sweep_case(dt, mode, stats, tf))
              for dt in ("float32", "bfloat16", "float16") for mode in HEAD_MODES for stats in ("logp", "all")
              for tf in ("plain", "softcap")]
    if cfg.dry:  # the first case of each prefix
        cases = [next(c for c in cases if c.name.startswith(prefix)) for prefix in DRY_CORRECTNESS]
    return cases


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


# ======================================================================================= part 2: the head


@dataclass(frozen=True)
class HeadCase:
    """One fwd+bwd at the LM head from a ``fastpref.benchmark.make_batch`` batch (grads land in .grad)."""

    step: Callable[[dict], None]
    what: str
    needs: str | None = None  # a module the case imports
    cuda_only: bool = False
    timeout_s: float = 60.0


def _shared_case(name: str) -> Callable[[dict], None]:
    def step(batch):
        if name not in head_bench.CASES:
            raise RuntimeError(f"fastpref.benchmark has no case {name!r}")
        head_bench.step(name, batch)

    return step


def _four_gemms(batch: dict) -> None:
    """The recompute floor: the 3-GEMM floor plus ``z = h W^T`` once more in the backward."""
    hidden, weight, labels = batch["hidden"], batch["weight"], batch["labels"]
    valid = labels != -100
    with torch.no_grad():
        h = hidden[valid]
        z = h @ weight.T
        torch.mm(h, weight.T, out=z)
        hidden.grad = torch.zeros_like(hidden)
        hidden.grad[valid] = z @ weight
        weight.grad = z.T @ h


def _fastpref_entropy(batch: dict) -> None:
    """Log-probs and entropies, both differentiable (an entropy bonus), recomputing the logits."""
    stats = fastpref.token_stats(batch["hidden"], batch["weight"], batch["labels"], entropy=True)
    (-(stats.logp.sum() + 0.01 * stats.entropy.sum())).backward()


def _flat(batch: dict):
    d = batch["hidden"].shape[-1]
    return batch["hidden"].view(-1, d), batch["weight"], batch["labels"].view(-1)


def _liger_flce(batch: dict) -> None:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    h, w, y = _flat(batch)
    # fp32 grad_W accumulation, as fastpref does (Liger's default accumulates in the weight dtype).
    LigerFusedLinearCrossEntropyLoss(reduction="sum", accum_dtype=torch.float32)(w, h, y).backward()


def _cut_cross_entropy(batch: dict) -> None:
    from cut_cross_entropy import linear_cross_entropy

    h, w, y = _flat(batch)
    linear_cross_entropy(h, w, y, reduction="sum").backward()


def _torch_linear_cross_entropy(batch: dict) -> None:
    if not hasattr(torch.nn.functional, "linear_cross_entropy"):
        raise Skip(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
    h, w, y = _flat(batch)
    options = torch.nn.LinearCrossEntropyOptions() if hasattr(torch.nn, "LinearCrossEntropyOptions") else None
    torch.nn.functional.linear_cross_entropy(h, w, y, reduction="sum", options=options).backward()


HEAD_CASES: dict[str, HeadCase] = {
    "gemm_floor": HeadCase(_shared_case("gemm_floor"), "cuBLAS: z = hWᵀ, dz W, dzᵀ h over the valid tokens"),
    "gemm_floor_4": HeadCase(_four_gemms, "cuBLAS: the same plus z recomputed (the recompute floor)"),
    "fastpref": HeadCase(_shared_case("fastpref"), "preference_loss dpo, logits_budget=0 (recompute)"),
    "fastpref_keep": HeadCase(_shared_case("fastpref_keep"), "preference_loss dpo, every chunk's logits kept"),
    "fastpref_entropy": HeadCase(_fastpref_entropy, "token_stats logp + entropy, both with gradient (recompute)"),
    "naive": HeadCase(_shared_case("naive"), "[N, V] logits, fp32 log-softmax, gather"),
    "trl_fused": HeadCase(_shared_case("trl_fused"), "TRL ChunkedLogProbFunction (chunk 32768)", needs="trl"),
    "liger_flce": HeadCase(_liger_flce, "Liger fused linear cross-entropy, fp32 accumulation", needs="liger_kernel",
                           cuda_only=True),
    "torch_lce": HeadCase(_torch_linear_cross_entropy, "torch.nn.functional.linear_cross_entropy, chunked"),
    "cce": HeadCase(_cut_cross_entropy, "Cut Cross-Entropy (cce, default filter_eps)", needs="cut_cross_entropy",
                    cuda_only=True, timeout_s=150),
    "liger": HeadCase(_shared_case("liger"), "Liger fused linear DPO (torch.compile on CUDA)", needs="liger_kernel",
                      timeout_s=180),
}


_batches: dict = {}


def head_shape(cfg: Config):
    """The benchmark shape as a ``fastpref.benchmark.Shape``."""
    return head_bench.Shape(**cfg.head)


def head_batch(cfg: Config) -> dict:
    """The benchmark's inputs, ``fastpref.benchmark.make_batch`` (one set per worker process)."""
    key = (head_shape(cfg), cfg.device)
    if key not in _batches:
        _batches.clear()
        _free_device_memory()
        _batches[key] = head_bench.make_batch(*key)
    return _batches[key]


def _reset(batch: dict) -> None:
    batch["hidden"].grad = batch["weight"].grad = None


def time_ms(fn: Callable[[], None], device: str, reps: int, warmup: int) -> dict:
    """Median (and spread) of ``reps`` timed calls after ``warmup`` untimed ones: CUDA events on CUDA."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "reps": reps}


def step_memory(fn: Callable[[], None], batch: dict, device: str) -> dict:
    """Peak allocated memory of one call above what was allocated before it (the inputs), and beyond the
    gradients it returns (grad_W + grad_hidden). CUDA only (the allocator's counters)."""
    if device != "cuda":
        return {}
    _reset(batch)
    _free_device_memory()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    grads = batch["hidden"].grad.nbytes + batch["weight"].grad.nbytes
    _reset(batch)
    return {"peak_extra_GiB": extra / GiB, "beyond_grads_GiB": (extra - grads) / GiB}


def measure_head(case: HeadCase, batch: dict, device: str, reps: int, warmup: int) -> dict:
    def run():
        _reset(batch)
        case.step(batch)

    timing = time_ms(run, device, reps, warmup)
    return {**timing, **step_memory(run, batch, device)}


def _needs(case: HeadCase, device: str) -> None:
    if case.cuda_only and device != "cuda":
        raise Skip("needs CUDA (Triton kernels)")
    if case.needs and importlib.util.find_spec(case.needs) is None:
        raise Skip(f"{case.needs} is not installed")


def bench_case(name: str) -> Callable[[Config], dict]:
    def run(cfg: Config) -> dict:
        case = HEAD_CASES[name]
        _needs(case, cfg.device)
        batch = head_batch(cfg)
        result = measure_head(case, batch, cfg.device, cfg.reps, cfg.warmup)
        return {**result, "what": case.what, **_target_checks(name, result, cfg)}

    return run


def _target_checks(name: str, result: dict, cfg: Config) -> dict:
    target = TARGETS.get(name)
    if not target or cfg.dry:
        return {}
    met = {k: result[k] <= v for k, v in target.items() if k in result}
    return {"target": target, "target_met": all(met.values())}


def bench_cases(cfg: Config) -> list[Case]:
    return [Case(name, bench_case(name), case.timeout_s) for name, case in HEAD_CASES.items()]


# ================================================================================== part 3: a trainer step

TRAINER_VARIANTS = ("fastpref", "trl_fused", "trl_materialised")


def trainer_case(variant: str) -> Callable[[Config], dict]:
    def run(cfg: Config) -> dict:
        for module in ("trl", "datasets", "transformers"):
            if importlib.util.find_spec(module) is None:
                raise Skip(f"{module} is not installed")
        import trl_memory

        result = trl_memory.run_variant(SimpleNamespace(variant=variant, **cfg.trainer))
        return {"step_s": result["seconds"], "peak_GiB": result["peak_rss"] / GiB,
                "step_peak_GiB": result["step_peak"] / GiB, "loss": result["loss"], "tokens": result["tokens"],
                "memory": "peak allocated" if cfg.device == "cuda" else "peak RSS",
                "model": {k: cfg.trainer[k] for k in ("layers", "hidden", "vocab", "intermediate", "dtype")}}

    return run


def trainer_cases(cfg: Config) -> list[Case]:
    return [Case(v, trainer_case(v), 120) for v in TRAINER_VARIANTS]


# ======================================================================================= part 4: tuning

KERNEL_ENV = ("FASTPREF_TRITON_BLOCK", "FASTPREF_TRITON_WARPS")


def chunk_tune_case(chunk: int, mode: str) -> Callable[[Config], dict]:
    def run(cfg: Config) -> dict:
        batch = head_batch(cfg)
        budget = KEEP_ALL if mode == "keep" else 0

        def step(b):
            fastpref.preference_loss(b["hidden"], b["weight"], b["labels"], loss="dpo", chunk_size=chunk,
                                     logits_budget=budget, ref_chosen_logps=b["ref_chosen"],
                                     ref_rejected_logps=b["ref_rejected"]).loss.backward()

        return {**measure_head(HeadCase(step, ""), batch, cfg.device, cfg.reps, cfg.warmup),
                "chunk_size": chunk, "mode": mode}

    return run


def _launch_config() -> Callable[[int], tuple[int, int]] | None:
    """``fastpref.ops.triton.launch_config(vocab) -> (BLOCK, num_warps)``, where fastpref exposes it."""
    try:
        return getattr(importlib.import_module("fastpref.ops.triton"), "launch_config", None)
    except Exception:  # noqa: BLE001 - no fastpref / triton here: the case says so
        return None


def kernel_tune_case(block: int, warps: int, mode: str) -> Callable[[Config], dict]:
    """BLOCK / num_warps of the row kernels through FASTPREF_TRITON_BLOCK / _WARPS: the case runs only when
    ``launch_config(vocab)`` reports the requested pair (read at launch, not at import)."""

    def run(cfg: Config) -> dict:
        saved = {k: os.environ.get(k) for k in KERNEL_ENV}
        os.environ.update(dict(zip(KERNEL_ENV, (str(block), str(warps)))))
        try:
            used = tuple(_launch_config()(cfg.head["vocab"]))
            if used != (block, warps):
                raise Skip(f"requested (BLOCK, num_warps) = {(block, warps)}, the kernels use {used}")
            name = "fastpref_keep" if mode == "keep" else "fastpref"
            batch = head_batch(cfg)
            result = measure_head(HEAD_CASES[name], batch, cfg.device, cfg.reps, cfg.warmup)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return {**result, "block": block, "num_warps": warps, "mode": mode}

    return run


def _no_kernel_knobs(cfg: Config) -> dict:
    raise Skip("fastpref.ops.triton exposes no launch_config(vocab) reading " + " / ".join(KERNEL_ENV))


def tune_cases(cfg: Config) -> list[Case]:
    cases = [Case(f"chunk {c} {mode}", chunk_tune_case(c, mode))
             for c in cfg.tune_chunks for mode in ("recompute", "keep")]
    if _launch_config() is None:
        return cases + [Case("BLOCK / num_warps", _no_kernel_knobs)]
    return cases + [Case(f"BLOCK {b} warps {w} {mode}", kernel_tune_case(b, w, mode))
                    for b, w in cfg.tune_kernels for mode in ("recompute", "keep")]


# ============================================================================================== reports


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
    (out / "results.json").write_text(json.dumps(_finite(results), indent=1))
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
               "out": str(args.out), "config": _finite(asdict(cfg)), "fastpref_import_error": FASTPREF_IMPORT_ERROR,
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
