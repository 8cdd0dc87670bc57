"""Benchmark harness: fwd+bwd of a DPO step at the LM head, fastpref vs the naive path, Liger, TRL and the GEMM floor.

Used by ``benchmarks/`` (pytest-benchmark) and by the report CLI ``python -m fastpref bench``. Every case
computes the same DPO (sigmoid) loss from the same hidden states, head weight, labels and precomputed
reference log-probs, then backpropagates to hidden and weight:

* ``gemm_floor`` — only the three GEMMs any exact method pays, over the valid tokens:
  ``z = h W^T``, ``dz W``, ``dz^T h`` (the time the others are divided by);
* ``naive`` — materialise the ``[N, V]`` logits of every position, fp32 log-softmax, gather (eager TRL);
* ``fastpref`` / ``fastpref_keep`` — :func:`fastpref.preference_loss` recomputing / keeping chunk logits;
* ``liger`` — Liger-Kernel's ``LigerFusedLinearDPOLoss`` (chunked torch, ``compiled=False`` on CPU);
* ``trl_fused`` — TRL's own fused head (``trl.kernels.ChunkedLogProbFunction``, TRL >= 1.x).

Each case runs in a fresh subprocess. Its first fwd+bwd is a warm-up (thread pools, MKL / cuBLAS
workspaces, kernel dispatch: ``cold_time_s``) and gives the peak memory: the peak RSS (CPU; reset through
``/proc/self/clear_refs``) or ``max_memory_allocated`` (CUDA) during that step, minus the level right after
the inputs were allocated. Only a fresh process's first step shows its whole footprint in the RSS: later
steps reuse pages the allocator kept. ``time_s`` is the best of ``repeats`` warm steps after it (other
processes on a shared machine only ever add time).

:func:`memory_sweep` measures the peak memory of one step against the number of tokens at a Llama-3
head (V = 128,256): the materialising paths grow linearly with the tokens, fastpref stays at one chunk
of logits plus the gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

CASES = ("gemm_floor", "naive", "fastpref", "fastpref_keep", "liger", "trl_fused")
GiB = 2**30


@dataclass(frozen=True)
class Shape:
    pairs: int = 1
    response: int = 1024  # completion tokens per response
    prompt: int = 0  # ignored (prompt / padding) positions per row
    d: int = 4096
    vocab: int = 128_256
    dtype: str = "float32"

    @property
    def rows(self) -> int:
        return 2 * self.pairs

    @property
    def valid_tokens(self) -> int:
        return self.rows * self.response

    def grad_bytes(self) -> int:
        """Bytes of grad_W + grad_hidden, which every method must produce."""
        size = torch.tensor([], dtype=getattr(torch, self.dtype)).element_size()
        return size * (self.vocab * self.d + self.rows * (self.prompt + self.response) * self.d)


PRESETS = {
    # Llama-3-8B head, one pair of 1024-token responses (the memory target of the core issue).
    "target": Shape(),
    # The same with a prompt as long as the response: half the positions are ignored.
    "target_half_prompt": Shape(prompt=1024),
    # Small enough for CI.
    "ci": Shape(pairs=2, response=64, prompt=32, d=256, vocab=8192),
}


def make_batch(shape: Shape, device: str = "cpu", seed: int = 0) -> dict:
    # Drawn on the device: a 2 GB head drawn on the CPU costs 5-10 s per case before a GPU step.
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    seq = shape.prompt + shape.response
    hidden = torch.randn(shape.rows, seq, shape.d, generator=g, device=device).to(dtype).requires_grad_(True)
    weight = (torch.randn(shape.vocab, shape.d, generator=g, device=device) / shape.d**0.5).to(dtype)
    weight.requires_grad_(True)
    labels = torch.randint(0, shape.vocab, (shape.rows, seq), generator=g, device=device)
    labels[:, : shape.prompt] = -100
    ref = -torch.rand(shape.rows, generator=g, device=device) * shape.response * 2
    return {"hidden": hidden, "weight": weight, "labels": labels, "ref_chosen": ref[: shape.pairs],
            "ref_rejected": ref[shape.pairs :]}


def _dpo_from_token_logps(logp: torch.Tensor, batch: dict) -> torch.Tensor:
    import fastpref

    seq = logp.sum(-1)
    pairs = seq.shape[0] // 2
    return fastpref.dpo_loss(seq[:pairs], seq[pairs:], batch["ref_chosen"], batch["ref_rejected"])[0]


def step(case: str, batch: dict) -> None:
    """One fwd+bwd of ``case`` (gradients land in ``hidden.grad`` and ``weight.grad``)."""
    import fastpref

    hidden, weight, labels = batch["hidden"], batch["weight"], batch["labels"]
    if case == "gemm_floor":
        valid = labels != -100
        with torch.no_grad():
            h = hidden[valid]
            z = h @ weight.T
            hidden.grad = torch.zeros_like(hidden)
            hidden.grad[valid] = z @ weight
            weight.grad = z.T @ h
        return
    if case == "naive":
        from .ops.reference import reference_token_stats

        loss = _dpo_from_token_logps(reference_token_stats(hidden, weight, labels).logp, batch)
    elif case in ("fastpref", "fastpref_keep"):
        loss = fastpref.preference_loss(
            hidden, weight, labels, loss="dpo", ref_chosen_logps=batch["ref_chosen"],
            ref_rejected_logps=batch["ref_rejected"], logits_budget=(1 << 62) if case == "fastpref_keep" else 0,
        ).loss
    elif case == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        # Liger takes no precomputed reference log-probs; reference-free DPO does the same work.
        criterion = LigerFusedLinearDPOLoss(beta=0.1, compiled=hidden.is_cuda, use_ref_model=False)
        loss = criterion(weight, hidden, labels)[0]
    elif case == "trl_fused":
        from trl.kernels import ChunkedLogProbFunction

        valid = labels != -100
        logp = ChunkedLogProbFunction.apply(hidden[valid], weight, None, labels[valid], 1.0, 32768)[0]
        loss = _dpo_from_token_logps(logp.new_zeros(labels.shape).masked_scatter(valid, logp), batch)
    else:
        raise ValueError(f"case must be one of {CASES}, got {case!r}")
    loss.backward()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def start_peak(device: str) -> int:
    """Resets the peak-memory counter and returns the current level (CUDA: allocated bytes; CPU: RSS).

    With :func:`peak_bytes` after the work: ``peak_bytes(device) - start_peak(device)`` is the work's peak.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:  # Linux >= 4.0: "5" resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except OSError:  # no /proc: the lifetime peak, which includes building the inputs
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_bytes(device: str) -> int:
    """The peak since :func:`start_peak` (CUDA: ``max_memory_allocated``; CPU: ``VmHWM``, the peak RSS)."""
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    try:
        return _status_bytes("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_in_process(case: str, shape: Shape, repeats: int = 1, device: str = "cpu") -> dict:
    """Peak extra memory and time of the first (cold) fwd+bwd, then the best time of ``repeats`` warm ones.

    Call in a fresh process (:func:`measure` does). ``repeats=0`` measures the memory only.
    """
    batch = make_batch(shape, device)
    base = start_peak(device)
    times = []
    for _ in range(1 + repeats):
        batch["hidden"].grad = batch["weight"].grad = None
        start = time.perf_counter()
        step(case, batch)
        _sync(device)
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            peak = peak_bytes(device)
    cold, warm = times[0], times[1:]
    timing = {"time_s": min(warm)} if warm else {}
    return {"case": case, **timing, "cold_time_s": cold, "repeats": repeats, "peak_extra_bytes": peak - base,
            "threads": torch.get_num_threads(), "device": device, **asdict(shape)}


def measure(case: str, shape: Shape, repeats: int = 1, device: str = "cpu", timeout: float = 3600) -> dict:
    """:func:`measure_in_process` in a fresh subprocess (so peak memory is this case's alone).

    A case that fails (a missing optional package, out of memory) gives ``{"case", "error"}``.
    """
    cmd = [sys.executable, "-m", "fastpref.benchmark", "--case", case, "--repeats", str(repeats), "--device", device,
           "--shape", json.dumps(asdict(shape))]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ})
    if out.returncode != 0:
        if out.returncode == -9:
            reason = "killed (SIGKILL: out of memory?)"
        else:
            reason = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit status {out.returncode}"
        return {"case": case, "error": reason, **asdict(shape)}
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(rows: list[dict], shape: Shape) -> str:
    """A markdown table with ratios to the GEMM floor and to the naive path, measured in one run."""
    times = {r["case"]: r["time_s"] for r in rows if "time_s" in r}
    baselines = [(b, label) for b, label in (("gemm_floor", "GEMM floor"), ("naive", "naive"), ("liger", "Liger"))
                 if b in times]
    grads = shape.grad_bytes()
    lines = [
        "| case | time (s) | " + " | ".join(f"÷ {label}" for _, label in baselines)
        + " | peak extra memory (GiB) | beyond grad_W + grad_hidden (GiB) |",
        "|---|---:|" + "---:|" * len(baselines) + "---:|---:|",
    ]
    for r in rows:
        if "time_s" not in r:
            lines.append(f"| {r['case']} | n/a ({r.get('error', '')[:60]}) |" + " |" * (len(baselines) + 2))
            continue
        t, mem = r["time_s"], r["peak_extra_bytes"]
        ratios = " | ".join(f"{t / times[b]:.2f}" for b, _ in baselines)
        lines.append(f"| {r['case']} | {t:.2f} | {ratios} | {mem / GiB:.2f} | {(mem - grads) / GiB:+.2f} |")
    return "\n".join(lines)


def missing_plot_dependency() -> str | None:
    """Why no plot can be drawn here (matplotlib is not importable), or ``None``: say it before measuring."""
    import importlib.util

    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else "matplotlib is not installed: tables and results are written, plots skipped " \
                              "(pip install matplotlib, or fastpref[demo])"


def wrapped(title: str, width: int = 110) -> str:
    """A plot title with its long lines wrapped."""
    import textwrap

    return "\n".join(textwrap.fill(line, width) for line in title.split("\n"))


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(rows: list[dict], path: str, title: str) -> None:
    """Bar charts of time and peak extra memory per case (PNG)."""
    plt = pyplot()
    ok = [r for r in rows if "time_s" in r]
    names = [r["case"] for r in ok]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    ax_t.bar(names, [r["time_s"] for r in ok], color="tab:blue")
    ax_t.set_ylabel("fwd+bwd time (s)")
    ax_m.bar(names, [r["peak_extra_bytes"] / GiB for r in ok], color="tab:orange")
    ax_m.set_ylabel("peak extra memory (GiB)")
    for ax in (ax_t, ax_m):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(wrapped(title))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- peak memory against the number of tokens -------------------------------------------------------------

SWEEP_TOKENS = (1024, 2048, 4096, 8192)
SWEEP_D = 256  # small, so that the sweep runs in a minute or two on a CPU; the logits' size does not depend on d
SWEEP_CASES = ("naive", "fastpref", "liger", "trl_fused")
# Cases whose peak grows with the tokens, and the fp32 [N, V] logits copies they hold at their peak (measured at
# V = 128,256 and 1k tokens, rounded up): a case is skipped when this would not fit in the available memory.
MATERIALISED_COPIES = {"gemm_floor": 2, "naive": 3, "liger": 4, "trl_fused": 2.5}  # Liger: a pair per chunk


def sweep_shape(tokens: int, d: int = SWEEP_D, vocab: int = 128_256) -> Shape:
    """One pair whose two responses have ``tokens // 2`` tokens each (no prompt): the batch of a long-context step."""
    if tokens < 2 or tokens % 2:
        raise ValueError(f"tokens must be an even integer >= 2, got {tokens}")
    return Shape(pairs=1, response=tokens // 2, d=d, vocab=vocab)


def available_bytes(device: str) -> int:
    """Memory a new case can still take: ``MemAvailable`` (CPU) or free device memory (CUDA)."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not skip


def needed_bytes(case: str, shape: Shape) -> int:
    """About what ``case`` needs at its peak if it materialises logits (0 if it does not): see MATERIALISED_COPIES."""
    copies = MATERIALISED_COPIES.get(case, 0)
    if not copies:
        return 0
    return int(copies * 4 * shape.rows * (shape.prompt + shape.response) * shape.vocab) + shape.grad_bytes()


def memory_sweep(cases=("naive", "fastpref"), tokens=SWEEP_TOKENS, d: int = SWEEP_D, device: str = "cpu",
                 log=print) -> list[dict]:
    """Peak extra memory of one fwd+bwd (each case in a fresh process) at each token count, V = 128,256.

    A materialising case that would need more than 80% of the memory available now is skipped (with the
    reason) rather than run into the out-of-memory killer; a row then has ``"skipped"`` instead of a peak.
    """
    rows = []
    for n in tokens:
        shape = sweep_shape(n, d)
        for case in cases:
            need, free = needed_bytes(case, shape), available_bytes(device)
            if need > 0.8 * free:  # leave room for everything else on the machine
                row = {"case": case, "skipped": f"needs ~{need / GiB:.1f} GiB, {free / GiB:.1f} GiB available",
                       **asdict(shape)}
            else:
                row = measure(case, shape, repeats=0, device=device)
            row["tokens"] = n
            rows.append(row)
            result = (f"{row['peak_extra_bytes'] / GiB:6.2f} GiB" if "peak_extra_bytes" in row
                      else row.get("skipped") or row.get("error"))
            log(f"  {n:6,} tokens  {case:<10} {result}", flush=True)
    return rows


def _sweep_grid(rows: list[dict]) -> tuple[list[int], list[str], dict]:
    tokens = sorted({r["tokens"] for r in rows})
    cases = list(dict.fromkeys(r["case"] for r in rows))
    return tokens, cases, {(r["tokens"], r["case"]): r for r in rows}


def report_sweep(rows: list[dict]) -> str:
    """Markdown: peak extra memory (GiB) per case and token count, the naive ÷ fastpref ratio, the gradients."""
    tokens, cases, grid = _sweep_grid(rows)
    ratio = "naive" in cases and "fastpref" in cases
    lines = ["| tokens | " + " | ".join(f"{c} (GiB)" for c in cases) + (" | naive ÷ fastpref" if ratio else "")
             + " | grad_W + grad_hidden (GiB) |",
             "|---:|" + "---:|" * (len(cases) + ratio + 1)]
    for n in tokens:
        cells = []
        for c in cases:
            r = grid.get((n, c), {})
            cells.append(f"{r['peak_extra_bytes'] / GiB:.2f}" if "peak_extra_bytes" in r
                         else "skipped" if "skipped" in r else "n/a")
        if ratio:
            a, b = grid.get((n, "naive"), {}), grid.get((n, "fastpref"), {})
            ok = "peak_extra_bytes" in a and b.get("peak_extra_bytes", 0) > 0
            cells.append(f"{a['peak_extra_bytes'] / b['peak_extra_bytes']:.1f}×" if ok else "")
        grads = sweep_shape(n, rows[0]["d"], rows[0]["vocab"]).grad_bytes()
        lines.append(f"| {n:,} | " + " | ".join(cells) + f" | {grads / GiB:.2f} |")
    notes = [f"{r['case']} at {r['tokens']:,} tokens: {r.get('skipped') or r.get('error')}"
             for r in rows if "peak_extra_bytes" not in r]
    return "\n".join(lines + ([""] + ["- " + n for n in notes] if notes else []))


def plot_sweep(rows: list[dict], path: str, title: str) -> None:
    """Peak extra memory against tokens, one line per case, with the gradients every method must produce."""
    plt = pyplot()
    tokens, cases, grid = _sweep_grid(rows)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for c in cases:
        pts = [(n, grid[n, c]["peak_extra_bytes"] / GiB) for n in tokens if "peak_extra_bytes" in grid.get((n, c), {})]
        if pts:
            (line,) = ax.plot(*zip(*pts), marker="o", linewidth=2.5 if c == "fastpref" else 1.5,
                              label=f"{c} ({pts[-1][1]:.2f} GiB at {pts[-1][0]:,} tokens)")
            for n, gib in pts if len(cases) <= 2 else []:  # more lines would overlap their labels
                ax.annotate(f"{gib:.2f}", (n, gib), textcoords="offset points", xytext=(0, 6), ha="center",
                            fontsize=8, color=line.get_color())
    grads = [sweep_shape(n, rows[0]["d"], rows[0]["vocab"]).grad_bytes() / GiB for n in tokens]
    ax.plot(tokens, grads, "k--", linewidth=1, label="grad_W + grad_hidden (any method)")
    ax.set_xlabel("tokens in the step (one pair, no prompt)")
    ax.set_ylabel("peak memory of fwd+bwd beyond the inputs (GiB)")
    ax.set_xticks(tokens, [f"{n:,}" for n in tokens])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(wrapped(title, 90), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- whole training steps (rows of fastpref.step_benchmark.run) -------------------------------------------


def plot_steps(rows: list[dict], path: str, title: str, labels: dict | None = None, baseline: str = "padded") -> None:
    """Backbone positions, step time and peak memory per trainer layout (horizontal bars, ratios to ``baseline``)."""
    plt = pyplot()
    ok = [r for r in rows if "error" not in r][::-1]  # first case on top
    if not ok:
        return
    names = [(labels or {}).get(r["case"], r["case"]) for r in ok]
    base = next((r for r in ok if r["case"] == baseline), None)
    panels = [("backbone positions", lambda r: r["positions"], "{:,.0f}"),
              ("step time (s)", lambda r: r.get("step_time_s") or r["cold_time_s"], "{:.2f}"),
              ("peak extra memory (GiB)", lambda r: r["peak_extra_bytes"] / GiB, "{:.2f}")]
    colours = {"trl": "tab:gray", "both": "tab:green"}
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.55 * len(ok) + 1.8), sharey=True)
    for ax, (xlabel, value, fmt) in zip(axes, panels):
        values = [value(r) for r in ok]
        bars = ax.barh(names, values, color=[colours.get(r["case"], "tab:blue") for r in ok])
        for bar, v in zip(bars, values):
            ratio = f"  ({v / value(base):.2f}×)" if base is not None and value(base) > 0 else ""
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + fmt.format(v) + ratio, va="center",
                    fontsize=8)
        ax.set_xlabel(xlabel + (f", ratio to {baseline}" if base is not None else ""))
        ax.set_xlim(0, 1.45 * max(values))
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(wrapped(title, 150), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from .cli import int_at_least

    parser = argparse.ArgumentParser(prog="python -m fastpref.benchmark", description="Measure one case (internal).")
    parser.add_argument("--case", choices=CASES, required=True)
    parser.add_argument("--shape", required=True, help="JSON of a Shape")
    parser.add_argument("--repeats", type=int_at_least(0), default=1, help="timed warm steps after the warm-up")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    result = measure_in_process(args.case, Shape(**json.loads(args.shape)), args.repeats, args.device)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
