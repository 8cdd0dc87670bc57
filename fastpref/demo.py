"""The main job: why fastpref exists, measured on this machine in about 2½ minutes (2 CPU cores).

``python -m fastpref demo`` (``./run.sh demo``), on CPU, offline, with embedded defaults:

1. memory: one DPO step (fwd+bwd) at a Llama-3 head (V = 128,256) from 1k to 4k tokens, each case in a
   fresh process: the naive path materialises the ``[tokens, V]`` logits and grows linearly, fastpref
   stays at one chunk of logits plus the gradients (``d = 128`` so this runs in a minute; the logits'
   size does not depend on it);
2. a whole DPO training step of a small Llama: TRL's own ``DPOTrainer`` against ``FastPrefDPOTrainer``
   padded, padding-free, with a shared prompt, and both: tokens through the backbone, step time,
   peak memory and the loss (the same in all);
3. training: a word-level tokenizer and a random-init ``LlamaForCausalLM`` built in-process, a
   procedural preference set (reverse a word list; the rejected answer swaps or drops words), a few
   SFT steps, then MallowsPO through ``FastPrefDPOTrainer`` (reference log-probs and entropies
   precomputed by fastpref, dispersion calibrated so the mean psi is 1): the loss falls.

Tables are printed as they are measured; the plots go to ``out/demo/`` at the end.
"""

from __future__ import annotations

import itertools
import os
import random
import time

import torch

import fastpref

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["sh" + v for v in "aeiou"]
SPECIAL = ["<pad>", "<unk>", "<eos>", "reverse", ":", "="]
STEP_REPEATS = 2  # timed warm steps per trainer layout (the best is shown): one is at the mercy of other load


def build_tokenizer(vocab_size: int = 32_000):
    """A word-level tokenizer over procedurally generated words (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ("".join(p) for n in (1, 2, 3) for p in itertools.product(SYLLABLES, repeat=n))
    vocab = {w: i for i, w in enumerate(itertools.chain(SPECIAL, itertools.islice(words, vocab_size - len(SPECIAL))))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def preference_pairs(tokenizer, n: int, seed: int = 0, words: int = 6, lexicon: int = 2000):
    """``n`` (prompt, chosen, rejected) triples: reverse a word list; the rejected answer swaps or drops words."""
    rng = random.Random(seed)
    lex = [tokenizer.convert_ids_to_tokens(i) for i in range(len(SPECIAL), len(SPECIAL) + lexicon)]
    out = []
    for _ in range(n):
        ws = rng.sample(lex, words)
        chosen = ws[::-1]
        rejected = list(chosen)
        if rng.random() < 0.5:
            i, j = rng.sample(range(words), 2)
            rejected[i], rejected[j] = rejected[j], rejected[i]
        else:
            rejected[rng.randrange(words)] = rng.choice(lex)
        # responses start with a space: TRL tokenises prompt + response as one text, and "=w" would be one word
        out.append({"prompt": "reverse : " + " ".join(ws) + " =", "chosen": " " + " ".join(chosen) + " <eos>",
                    "rejected": " " + " ".join(rejected) + " <eos>"})
    return out


def collate(tokenizer, examples):
    """Rows ``[chosen; rejected]``: input ids, attention mask, labels with -100 on prompt and padding."""
    rows = [(e["prompt"], e[k]) for k in ("chosen", "rejected") for e in examples]
    ids, labels = [], []
    for prompt, response in rows:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        ids.append(p + r)
        labels.append([-100] * len(p) + r)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([x + [-100] * (width - len(x)) for x in labels]),
    }


def tiny_llama(vocab_size: int, seed: int = 0, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, **config)
    return LlamaForCausalLM(config)


def _hidden(model, batch):
    return model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def sft_warmup(model, tokenizer, data, steps: int, batch_pairs: int, lr: float = 3e-3, log=print) -> None:
    """A few steps of NLL on the chosen responses (fused: level-1 log-probs), so the reference has opinions."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        examples = data[(step * batch_pairs) % len(data) :][:batch_pairs]
        batch = collate(tokenizer, examples)
        labels = fastpref.shift_labels(batch["labels"][: len(examples)])  # chosen rows
        hidden = _hidden(model, {k: v[: len(examples)] for k, v in batch.items()})
        logp = fastpref.token_stats(hidden, model.lm_head.weight, labels).logp
        loss = -logp.sum() / (labels != -100).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 10 == 0 or step == 0:
            log(f"sft {step + 1:3d}  nll {loss.item():.4f}")


def train(steps: int = 40, batch_pairs: int = 8, num_pairs: int = 32, sft_steps: int = 30, lr: float = 1e-4,
          seed: int = 0, log=print) -> list[dict]:
    """SFT warm-up, then MallowsPO through TRL's trainer with fastpref's fused loss; returns per-step logs.

    :class:`fastpref.integrations.trl.FastPrefDPOTrainer` precomputes the reference log-probs and
    entropies of the warmed-up model with fastpref, calibrates MallowsPO's ``c`` on them (mean psi = 1),
    then trains MallowsPO-theta with the reference term (``reference_free=False``) on mean log-probs,
    beta = 10, cycling a small fixed set of ``num_pairs`` pairs so the loss visibly falls. The trainer's
    progress bar stays (stderr); its raw per-step metric dicts are replaced by the compact table of
    :func:`print_history`.
    """
    import contextlib
    import io

    from datasets import Dataset

    from .integrations.trl import train_demo

    tokenizer = build_tokenizer()
    model = tiny_llama(len(tokenizer), seed, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    data = preference_pairs(tokenizer, num_pairs, seed)
    sft_warmup(model, tokenizer, data, sft_steps, batch_pairs, log=log)
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer prints every step's metrics as a dict
        _, history = train_demo(
            model, tokenizer, Dataset.from_list(data), loss="mallows_dpo",
            loss_kwargs={"beta": 10.0, "reference_free": False},
            max_steps=steps, learning_rate=lr, batch_size=batch_pairs, seed=seed, calibrate_dispersion=True,
            disable_tqdm=False,
        )
    return [h for h in history if "loss" in h and "train_loss" not in h]


def print_history(history: list[dict], every: int = 5, log=print) -> None:
    """TRL's metrics (its names) of every ``every``-th step, and the first and last."""
    columns = ("loss", "rewards/accuracies", "rewards/margins", "neg_log_dispersion")
    log("| step | " + " | ".join(columns) + " |")
    log("|---:|" + "---:|" * len(columns))
    for i, h in enumerate(history):
        if i == 0 or (i + 1) % every == 0 or i == len(history) - 1:
            log(f"| {h.get('step', i + 1)} | " + " | ".join(f"{float(h[c]):.4f}" for c in columns) + " |")


def memory_demo(tokens, d: int, out_dir: str, log=print) -> tuple[list, str]:
    """Section 1: peak memory of a DPO step against tokens at a Llama-3 head; returns (plots to draw, summary)."""
    from .benchmark import GiB, memory_sweep, plot_sweep, report_sweep, sweep_shape

    vocab = sweep_shape(2).vocab
    log(f"\n## Memory: one DPO step (fwd+bwd) at a Llama-3 head, V={vocab:,}, d={d} "
        f"(d kept small so this runs in a minute; the [tokens, V] logits do not depend on d)")
    log("The naive path materialises the logits of every token; fastpref keeps one chunk of them at a time.")
    rows = memory_sweep(("naive", "fastpref"), tokens, d, log=log)
    log("\nPeak memory of the step beyond its inputs, GiB (each case in a fresh process; peak RSS):\n")
    log(report_sweep(rows))
    title = (f"Peak memory of one DPO step (fwd+bwd) at a Llama-3 head, CPU fp32\n"
             f"V={vocab:,}, d={d} (small d keeps the demo quick; the logits do not depend on d)")
    peaks = {(r["case"], r["tokens"]): r["peak_extra_bytes"] / GiB for r in rows if "peak_extra_bytes" in r}
    top = max((n for n in tokens if ("naive", n) in peaks and ("fastpref", n) in peaks), default=None)
    summary = (f"memory: at {top:,} tokens one DPO step at a Llama-3 head peaks at {peaks['naive', top]:.2f} GiB "
               f"naively and {peaks['fastpref', top]:.2f} GiB with fastpref, whose peak does not grow with the tokens"
               if top else "memory: no naive/fastpref pair measured")
    return [(plot_sweep, rows, os.path.join(out_dir, "memory_vs_tokens.png"), title)], summary


def training_demo(args, log=print) -> tuple[list, str]:
    """Section 3: MallowsPO through FastPrefDPOTrainer on a tiny Llama, the loss falls; returns ([], summary)."""
    log(f"\n## Training: {args.sft_steps} SFT steps, then {args.steps} MallowsPO steps through "
        f"FastPrefDPOTrainer (tiny Llama, 32,000-word tokenizer, procedural pairs)")
    history = train(args.steps, args.batch_pairs, args.num_pairs, args.sft_steps, log=log)
    print_history(history, log=log)
    first, last = history[0], history[-1]
    summary = (f"training: MallowsPO through FastPrefDPOTrainer, loss {first['loss']:.4f} -> {last['loss']:.4f}, "
               f"reward accuracy {first['rewards/accuracies']:.2f} -> {last['rewards/accuracies']:.2f}, "
               f"margins {first['rewards/margins']:+.3f} -> {last['rewards/margins']:+.3f}")
    log(f"\n{summary}")
    return [], summary


def step_demo(out_dir: str, log=print) -> tuple[list, str]:
    """Section 2: one DPO optimizer step through each trainer layout, side by side; returns (plots, summary)."""
    from . import step_benchmark
    from .benchmark import plot_steps

    shape = step_benchmark.PRESETS["demo"]
    log("\n## A whole DPO training step: TRL's DPOTrainer against FastPrefDPOTrainer, padded, padding-free "
        "(no padding rows), with a shared prompt (each prompt run once per pair), and both")
    log(f"One optimizer step (forward + backward + AdamW) on {shape.describe()}. Each case in a fresh process; "
        f"time: the best of {STEP_REPEATS} warm steps after a warm-up step, which gives the peak memory.")
    label = step_benchmark.LABELS

    def progress(row):
        log(f"  {label[row['case']]:<48} " + (row["error"] if "error" in row else
                                               f"{row['positions']:6,} positions  {row['step_time_s']:.2f} s"),
            flush=True)

    rows = step_benchmark.run(shape, repeats=STEP_REPEATS, progress=progress)
    log("\n" + step_benchmark.table(rows))
    both, trl = ({r["case"]: r for r in rows}.get(c, {}) for c in ("both", "trl"))
    summary = "training step: the padding-free + shared-prompt case did not run"
    if "time_ratio" in both:
        summary = (f"training step: padding-free + shared prompt takes {both['time_ratio']:.2f}x the time of the "
                   f"padded FastPrefDPOTrainer step and {both['positions_ratio']:.2f}x its backbone positions, with "
                   f"the same loss (max |difference| {both['loss_delta']:.1e})"
                   + (f"; TRL's own DPOTrainer takes {trl['time_ratio']:.2f}x" if "time_ratio" in trl else ""))
        log(f"\n{summary}")
    title = f"One DPO optimizer step, CPU fp32 ({torch.get_num_threads()} threads)\n{shape.describe()}"
    return [(plot_steps, rows, os.path.join(out_dir, "train_step.png"), title, label)], summary


def add_arguments(parser) -> None:
    from .cli import even_tokens, int_at_least

    parser.add_argument("--sweep-tokens", nargs="+", type=even_tokens, default=[1024, 2048, 4096], metavar="N",
                        help="memory section: tokens per step (one pair of equal responses each)")
    parser.add_argument("--sweep-d", type=int_at_least(1), default=128, metavar="D",
                        help="memory section: hidden size of the head (V = 128,256; small so it runs in a minute)")
    parser.add_argument("--steps", type=int_at_least(1), default=40, metavar="N",
                        help="training section: MallowsPO training steps")
    parser.add_argument("--sft-steps", type=int_at_least(0), default=30, metavar="N",
                        help="training section: SFT warm-up steps before MallowsPO (so the reference has opinions)")
    parser.add_argument("--batch-pairs", type=int_at_least(1), default=8, metavar="N",
                        help="training section: preference pairs per step")
    parser.add_argument("--num-pairs", type=int_at_least(1), default=32, metavar="N",
                        help="training section: size of the procedural preference set (cycled; a multiple "
                             "of --batch-pairs)")
    parser.add_argument("--skip", nargs="+", default=[], choices=["memory", "step", "training"],
                        help="sections to leave out")
    parser.add_argument("--out", default="out/demo", metavar="DIR", help="directory for the plots")


def run(args) -> None:
    from .benchmark import missing_plot_dependency

    if "training" not in args.skip and args.num_pairs % args.batch_pairs:
        # cycling the set, a step at its end would hold the remainder of the pairs, not batch_pairs
        args.parser.error(f"argument --num-pairs: must be a multiple of --batch-pairs ({args.batch_pairs}) so every "
                          f"step has {args.batch_pairs} pairs, got {args.num_pairs}")
    missing = missing_plot_dependency()
    sections = [("memory", "peak memory of a DPO step at a Llama-3 head: naive grows with the tokens, fastpref "
                           "stays flat", lambda: memory_demo(args.sweep_tokens, args.sweep_d, args.out)),
                ("step", "one DPO training step: TRL's DPOTrainer vs FastPrefDPOTrainer padded, padding-free, "
                         "shared prompt, both", lambda: step_demo(args.out)),
                ("training", "MallowsPO through FastPrefDPOTrainer on a tiny Llama: the loss falls",
                 lambda: training_demo(args))]
    sections = [s for s in sections if s[0] not in args.skip]
    print(f"fastpref demo: fused preference losses straight from the hidden states and the LM-head weight, never "
          f"the full logits (CPU, {torch.get_num_threads()} threads; about a minute per section)")
    if missing:
        print(f"note: {missing}")
    for i, (_, what, _) in enumerate(sections, 1):
        print(f"  {i}. {what}")
    plots, summaries = [], []
    for _, _, section in sections:
        start = time.perf_counter()
        section_plots, summary = section()
        print(f"({time.perf_counter() - start:.0f} s)")
        plots += section_plots
        summaries.append(summary)
    if plots and not missing:
        os.makedirs(args.out, exist_ok=True)
        for draw, *plot_args in plots:
            draw(*plot_args)
    print("\n## In short\n" + "\n".join(f"- {s}" for s in summaries))
    if plots and not missing:
        print("plots: " + ", ".join(p[2] for p in plots))


def main(argv: list[str] | None = None) -> None:
    """``python -m fastpref demo`` with ``argv``."""
    from .cli import main as cli_main

    cli_main(["demo", *(argv or [])])
