"""Whole-step benchmark: one DPO optimizer step of a small Llama, padded against padding-free and shared prompt.

One optimizer step (forward + backward + AdamW step) on the same model, data and precomputed reference
log-probs, side by side in one run:

* ``trl`` — TRL's own ``DPOTrainer`` (padded ``[2B, T]`` batch, its fused LM head);
* ``padded`` — ``FastPrefDPOTrainer``, the same padded batch, fastpref's fused loss;
* ``padding_free`` — sequences packed into rows, a block-diagonal 4-D mask, no padding;
* ``share_prompt`` — each pair laid out once as ``prompt · chosen · rejected`` (one row per pair);
* ``both`` — shared-prompt pairs packed into rows.

The model is a random-init ``LlamaForCausalLM`` whose backbone dominates the step (``report``: 6 layers,
d = 512, 8 heads / 4 KV heads, intermediate 1,408, V = 32,000, fp32, ``sdpa``); the data are ``pairs``
prompts with a chosen and a rejected response whose lengths are drawn from log-normal distributions
(median ``prompt`` / ``response`` tokens, sigma ``sigma``, clipped to [4, 4 x median]): the long tail
is what makes padding expensive. Each case runs in a fresh process: its first step is a warm-up that
gives the peak memory (peak RSS above the level before the step on CPU, ``max_memory_allocated``
on CUDA), its time is the best of ``repeats`` warm steps after it. ``losses`` are every step's: the
first from the initial weights (ln 2 whenever the policy's log-probs equal the precomputed reference's),
the second after one AdamW update, so equal losses mean equal gradients too. ``positions`` counts what
the backbone runs (rows x width, padding included); ``tokens`` the real tokens among them;
``collate_s`` the collator's time on the batch (dataloader work, outside the step).

    python -m fastpref.step_benchmark --preset report     # the README table
    run("demo")                                            # what the demo shows (under a minute on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from .benchmark import peak_bytes, start_peak

CASES = ("trl", "padded", "padding_free", "share_prompt", "both")
LABELS = {
    "trl": "TRL DPOTrainer (padded)",
    "padded": "FastPrefDPOTrainer, padded",
    "padding_free": "FastPrefDPOTrainer, padding_free",
    "share_prompt": "FastPrefDPOTrainer, share_prompt",
    "both": "FastPrefDPOTrainer, padding_free + share_prompt",
}
LAYOUT_OPTIONS = {  # case: (padding_free, share_prompt)
    "padded": (False, False), "padding_free": (True, False), "share_prompt": (False, True), "both": (True, True),
}
BASELINE = "padded"
GiB = 2**30
SPECIALS = ("<pad>", "<unk>", "</s>")


@dataclass(frozen=True)
class StepShape:
    """The model and the length distribution of one benchmark batch (``pairs`` pairs, one step)."""

    pairs: int = 8
    prompt: int = 150  # median prompt tokens
    response: int = 250  # median tokens of each response
    sigma: float = 0.6  # log-normal spread of every length
    layers: int = 6
    d: int = 512
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 1408
    vocab: int = 32_000
    learning_rate: float = 1e-6  # small enough that the second step's loss is not saturated
    seed: int = 0

    def describe(self) -> str:
        return (f"{self.pairs} pairs; prompt ~ LogNormal(median {self.prompt}, sigma {self.sigma}), responses ~ "
                f"LogNormal(median {self.response}, sigma {self.sigma}), clipped to [4, 4 x median]; Llama "
                f"{self.layers} layers, d={self.d}, {self.heads}/{self.kv_heads} heads, intermediate "
                f"{self.intermediate}, V={self.vocab:,}, fp32, sdpa; DPO (sigmoid, beta 0.1), precomputed reference, "
                f"AdamW lr {self.learning_rate:g}")


PRESETS = {
    "report": StepShape(),
    "demo": StepShape(prompt=32, response=48, layers=4, d=384, heads=6, kv_heads=2, intermediate=1024, vocab=4000,
                      learning_rate=1e-5),
    "ci": StepShape(pairs=4, prompt=12, response=20, layers=2, d=64, heads=4, kv_heads=2, intermediate=128,
                    vocab=512, learning_rate=1e-4),
}


def sample_lengths(shape: StepShape) -> list[tuple[int, int, int]]:
    """``(prompt, chosen, rejected)`` lengths of each pair: log-normal around the medians, long-tailed."""
    rng = random.Random(shape.seed)

    def draw(median: int) -> int:
        return int(min(4 * median, max(4, round(median * math.exp(rng.gauss(0.0, shape.sigma))))))

    return [(draw(shape.prompt), draw(shape.response), draw(shape.response)) for _ in range(shape.pairs)]


def make_tokenizer(vocab: int):
    """A word-level tokenizer (``w0 .. w{V-4}`` and the specials): one word is one token (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIALS) + [f"w{i}" for i in range(vocab - len(SPECIALS))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def make_dataset(shape: StepShape):
    """``prompt`` / ``chosen`` / ``rejected`` texts with :func:`sample_lengths` tokens (responses end in EOS)."""
    from datasets import Dataset

    rng = random.Random(shape.seed + 1)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(shape.vocab - len(SPECIALS))}" for _ in range(n))

    rows = {"prompt": [], "chosen": [], "rejected": []}
    for p, c, r in sample_lengths(shape):
        rows["prompt"].append(words(p))
        rows["chosen"].append(" " + words(c - 1) + " </s>")
        rows["rejected"].append(" " + words(r - 1) + " </s>")
    return Dataset.from_dict(rows)


def make_model(shape: StepShape):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(shape.seed)
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.d, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=8192, tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")
    return model


def make_trainer(case: str, shape: StepShape, model=None):
    """The trainer of ``case`` on :func:`make_dataset` (one batch of all pairs), its optimizer created."""
    import datasets

    datasets.disable_progress_bars()
    if case == "trl":
        from trl import DPOConfig as Config, DPOTrainer as Trainer

        options = {}
    else:
        from .integrations.trl import FastPrefDPOConfig as Config, FastPrefDPOTrainer as Trainer

        padding_free, share_prompt = LAYOUT_OPTIONS[case]
        options = {"padding_free": padding_free, "share_prompt": share_prompt}
    args = Config(
        output_dir=tempfile.mkdtemp(prefix="fastpref-step-"), per_device_train_batch_size=shape.pairs, max_steps=1,
        learning_rate=shape.learning_rate, max_length=None, precompute_ref_log_probs=True, report_to="none",
        save_strategy="no", use_cpu=not torch.cuda.is_available(), bf16=False, disable_tqdm=True, seed=shape.seed,
        **options,
    )
    trainer = Trainer(model if model is not None else make_model(shape), args=args, train_dataset=make_dataset(shape),
                      processing_class=make_tokenizer(shape.vocab))
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # what `train()` sets before its first step
    return trainer


def step_batch(trainer) -> dict:
    """The trainer's own first batch (all pairs, with their precomputed reference log-probs)."""
    return next(iter(trainer.get_train_dataloader()))


def collate_seconds(trainer, repeats: int = 3) -> float:
    """Best time of the trainer's collator on the whole dataset (a dataloader worker's work, not the step's)."""
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        trainer.data_collator(examples)
        times.append(time.perf_counter() - start)
    return min(times)


def batch_sizes(batch: dict) -> tuple[int, int]:
    """``(backbone positions, real tokens)`` of a padded or packed batch."""
    real = batch["example_ids"] >= 0 if "example_ids" in batch else batch["attention_mask"]
    return batch["input_ids"].numel(), int(real.sum())


def optimizer_step(trainer, batch: dict) -> float:
    """Forward, backward and AdamW step of the trainer on ``batch``; returns the loss."""
    loss = trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(loss)


def measure_in_process(case: str, shape: StepShape, repeats: int = 1) -> dict:
    """One row: the warm-up step's peak memory and loss, the best of ``repeats`` warm steps' time."""
    if case not in CASES:
        raise ValueError(f"fastpref: `case` must be one of {CASES}, got {case!r}")
    os.environ.setdefault("TQDM_DISABLE", "1")
    trainer = make_trainer(case, shape)
    batch = step_batch(trainer)
    positions, tokens = batch_sizes(batch)
    times, cpu_times, losses = [], [], []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = start_peak(device)
    for _ in range(1 + repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(optimizer_step(trainer, batch))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        if len(times) == 1:
            peak = peak_bytes(device) - base
    return {"case": case, "positions": positions, "tokens": tokens, "losses": losses,
            "collate_s": collate_seconds(trainer), "step_time_s": min(times[1:]) if repeats else None,
            "step_cpu_s": min(cpu_times[1:]) if repeats else None, "cold_time_s": times[0],
            "peak_extra_bytes": peak, "repeats": repeats, "threads": torch.get_num_threads(), **asdict(shape)}


def measure(case: str, shape: StepShape, repeats: int = 1, timeout: float = 3600, cpu_only: bool = False) -> dict:
    """:func:`measure_in_process` in a fresh process (its peak memory is its own); a failure gives ``error``.

    ``cpu_only`` hides any GPU from that process (the step otherwise runs on CUDA where there is one)."""
    cmd = [sys.executable, "-m", "fastpref.step_benchmark", "--case", case, "--repeats", str(repeats),
           "--shape", json.dumps(asdict(shape))]
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if cpu_only else {})}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        reason = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit status {out.returncode}"
        return {"case": case, "error": reason, **asdict(shape)}
    return json.loads(out.stdout.strip().splitlines()[-1])


def with_ratios(rows: list[dict]) -> list[dict]:
    """Adds ``time_ratio`` / ``positions_ratio`` (÷ the padded ``FastPrefDPOTrainer``) and ``loss_delta``."""
    base = next((r for r in rows if r["case"] == BASELINE and "error" not in r), None)
    out = []
    for r in rows:
        r = dict(r)
        if base is not None and "error" not in r:
            if r.get("step_time_s") and base.get("step_time_s"):
                r["time_ratio"] = r["step_time_s"] / base["step_time_s"]
            if r.get("step_cpu_s") and base.get("step_cpu_s"):
                r["cpu_ratio"] = r["step_cpu_s"] / base["step_cpu_s"]
            r["positions_ratio"] = r["positions"] / base["positions"]
            r["loss_delta"] = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
        out.append(r)
    return out


def best_of(rows: list[dict]) -> dict:
    """One case's rows from several rounds as one: the fastest warm step (wall and CPU), the first round's rest."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return rows[0]
    best = dict(ok[0])
    for key in ("step_time_s", "step_cpu_s"):
        values = [r[key] for r in ok if r.get(key) is not None]
        best[key] = min(values) if values else None
    best["rounds"] = len(ok)
    return best


def run(shape: StepShape | str = "demo", cases=CASES, repeats: int = 1, isolate: bool = True,
        progress=None, rounds: int = 1, cpu_only: bool = False) -> list[dict]:
    """Every case of one batch, side by side: rows for :func:`table` (see :func:`measure_in_process`).

    ``shape``: a :class:`StepShape` or a preset name (``"report"``, ``"demo"``, ``"ci"``); ``isolate``
    runs each case in a fresh process (peak memory per case); ``progress(row)`` is called after each case.
    ``rounds`` > 1 measures every case again, interleaved, and keeps each case's fastest step: on a
    shared machine the load changes while the cases run one after another. ``cpu_only``: on CPU even
    where there is a GPU (each case's process does not see it; needs ``isolate``).
    """
    if cpu_only and not isolate and torch.cuda.is_available():
        raise ValueError("fastpref: `cpu_only` needs `isolate=True` (this process sees the GPU)")
    shape = PRESETS[shape] if isinstance(shape, str) else shape
    measured = {case: [] for case in cases}
    for _ in range(rounds):
        for case in cases:
            if isolate:
                row = measure(case, shape, repeats, cpu_only=cpu_only)
            else:
                row = measure_in_process(case, shape, repeats)
            measured[case].append(row)
            if progress is not None:
                progress(row)
    return with_ratios([best_of(measured[case]) for case in cases])


def table(rows: list[dict]) -> str:
    """A markdown table of :func:`run`'s rows (ratios to the padded ``FastPrefDPOTrainer``)."""
    lines = ["| case | backbone positions | real tokens | step (s) | ÷ padded time | ÷ padded CPU time | "
             "÷ padded positions | peak extra memory (GiB) | losses (step 1, 2) | collate (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in with_ratios(rows):
        label = LABELS.get(r["case"], r["case"])
        if "error" in r:
            lines.append(f"| {label} | n/a ({r['error'][:60]}) | | | | | | | | |")
            continue
        step = f"{r['step_time_s']:.2f}" if r.get("step_time_s") else f"{r['cold_time_s']:.2f} (cold)"
        time_ratio = f"{r['time_ratio']:.2f}" if "time_ratio" in r else ""
        cpu_ratio = f"{r['cpu_ratio']:.2f}" if "cpu_ratio" in r else ""
        positions_ratio = f"{r['positions_ratio']:.2f}" if "positions_ratio" in r else ""
        losses = ", ".join(f"{x:.6f}" for x in r["losses"][:2])
        lines.append(f"| {label} | {r['positions']:,} | {r['tokens']:,} | {step} | {time_ratio} | {cpu_ratio} | "
                     f"{positions_ratio} | "
                     f"{r['peak_extra_bytes'] / GiB:.2f} | {losses} | {r['collate_s']:.3f} |")
    return "\n".join(lines)


def summary(rows: list[dict], case: str = "both") -> str:
    """One line: ``case`` against the padded ``FastPrefDPOTrainer`` (time, positions, memory, loss)."""
    rows = {r["case"]: r for r in with_ratios(rows)}
    r, base = rows.get(case), rows.get(BASELINE)
    if r is None or base is None or "error" in r or "error" in base or "time_ratio" not in r:
        return f"{LABELS.get(case, case)}: not measured against {LABELS[BASELINE]}"
    return (f"{LABELS[case]}: {r['time_ratio']:.2f} x the padded step time, {r['positions_ratio']:.2f} x its backbone "
            f"positions, {r['peak_extra_bytes'] / max(base['peak_extra_bytes'], 1):.2f} x its peak memory; losses "
            f"within {r['loss_delta']:.1e}")


def main(argv: list[str] | None = None) -> None:
    from .cli import int_at_least

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="report", choices=sorted(PRESETS))
    parser.add_argument("--shape", help="a StepShape as JSON (overrides --preset)")
    parser.add_argument("--case", choices=CASES, help="measure one case in this process and print its row as JSON")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--repeats", type=int_at_least(0), default=2,
                        help="timed warm steps after the warm-up (best reported)")
    parser.add_argument("--rounds", type=int_at_least(1), default=1,
                        help="measure every case this many times, interleaved")
    args = parser.parse_args(argv)
    shape = StepShape(**json.loads(args.shape)) if args.shape else PRESETS[args.preset]
    if args.case:
        print(json.dumps(measure_in_process(args.case, shape, args.repeats)))
        return
    print(f"one optimizer step: {shape.describe()}; {torch.get_num_threads()} threads")
    rows = run(shape, args.cases, args.repeats, rounds=args.rounds,
               progress=lambda r: print(f"  {r['case']}: {r.get('error', 'done')}", flush=True))
    print(table(rows))
    print(summary(rows))


if __name__ == "__main__":
    main()
