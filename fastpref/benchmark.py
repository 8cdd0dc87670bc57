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

Peak memory is measured in a fresh subprocess per case: the peak RSS (CPU; reset through
``/proc/self/clear_refs``) or ``max_memory_allocated`` (CUDA) during the first fwd+bwd, minus the level
right after the inputs were allocated.
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
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    seq = shape.prompt + shape.response
    hidden = torch.randn(shape.rows, seq, shape.d, generator=g).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(shape.vocab, shape.d, generator=g) / shape.d**0.5).to(device, dtype).requires_grad_(True)
    labels = torch.randint(0, shape.vocab, (shape.rows, seq), generator=g).to(device)
    labels[:, : shape.prompt] = -100
    ref = (-torch.rand(shape.rows, generator=g) * shape.response * 2).to(device)
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


def _start_peak(device: str) -> int:
    """Resets the peak-memory counter and returns the current level."""
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


def _peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        return _status_bytes("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_in_process(case: str, shape: Shape, repeats: int = 1, device: str = "cpu") -> dict:
    """Time (median of ``repeats``) and peak extra memory of the FIRST fwd+bwd; call in a fresh process."""
    batch = make_batch(shape, device)
    base = _start_peak(device)
    times = []
    for _ in range(repeats):
        batch["hidden"].grad = batch["weight"].grad = None
        start = time.perf_counter()
        step(case, batch)
        _sync(device)
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            peak = _peak_bytes(device)
    times.sort()
    return {"case": case, "time_s": times[len(times) // 2], "peak_extra_bytes": peak - base,
            "threads": torch.get_num_threads(), "device": device, **asdict(shape)}


def measure(case: str, shape: Shape, repeats: int = 1, device: str = "cpu", timeout: float = 3600) -> dict:
    """:func:`measure_in_process` in a fresh subprocess (so peak memory is this case's alone)."""
    cmd = [sys.executable, "-m", "fastpref.benchmark", "--case", case, "--repeats", str(repeats), "--device", device,
           "--shape", json.dumps(asdict(shape))]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ})
    if out.returncode != 0:
        return {"case": case, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
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


def plot(rows: list[dict], path: str, title: str) -> None:
    """Bar charts of time and peak extra memory per case (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "time_s" in r]
    names = [r["case"] for r in ok]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    ax_t.bar(names, [r["time_s"] for r in ok], color="tab:blue")
    ax_t.set_ylabel("fwd+bwd time (s)")
    ax_m.bar(names, [r["peak_extra_bytes"] / GiB for r in ok], color="tab:orange")
    ax_m.set_ylabel("peak extra memory (GiB)")
    for ax in (ax_t, ax_m):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastpref.benchmark", description="Measure one case (internal).")
    parser.add_argument("--case", choices=CASES, required=True)
    parser.add_argument("--shape", required=True, help="JSON of a Shape")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    result = measure_in_process(args.case, Shape(**json.loads(args.shape)), args.repeats, args.device)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
