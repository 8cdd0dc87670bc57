"""The main job: train a tiny Llama with MallowsPO through the fused path, then measure the real head.

``python -m fastpref demo`` (``./run.sh demo``), on CPU, offline, with embedded defaults:

1. builds a word-level tokenizer in-process (32,000 words) and a random-init ``LlamaForCausalLM``;
2. generates a preference set procedurally: the prompt lists words, the chosen response reverses them,
   the rejected response is a corrupted reversal;
3. warms the model up with a few SFT steps (fused NLL from level 1), then trains a few dozen MallowsPO
   steps through TRL's ``DPOTrainer`` with fastpref's fused loss (``FastPrefDPOTrainer``): reference
   log-probs and entropies of the warmed-up model precomputed by fastpref, MallowsPO's dispersion
   constant calibrated on them, a progress bar and the metrics of every step;
4. measures one DPO fwd+bwd at Llama-3-8B head dims (d=4096, V=128,256): time and peak memory of
   fastpref vs the naive materialising path and the GEMM floor; prints the table and writes a PNG.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random

import torch

import fastpref

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["sh" + v for v in "aeiou"]
SPECIAL = ["<pad>", "<unk>", "<eos>", "reverse", ":", "="]


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
        out.append({"prompt": "reverse : " + " ".join(ws) + " =", "chosen": " ".join(chosen) + " <eos>",
                    "rejected": " ".join(rejected) + " <eos>"})
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
    beta = 10, cycling a small fixed set of ``num_pairs`` pairs so the loss visibly falls.
    """
    from datasets import Dataset

    from .integrations.trl import train_demo

    tokenizer = build_tokenizer()
    model = tiny_llama(len(tokenizer), seed, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    data = preference_pairs(tokenizer, num_pairs, seed)
    sft_warmup(model, tokenizer, data, sft_steps, batch_pairs, log=log)
    _, history = train_demo(
        model, tokenizer, Dataset.from_list(data), loss="mallows_dpo",
        loss_kwargs={"beta": 10.0, "reference_free": False},
        max_steps=steps, learning_rate=lr, batch_size=batch_pairs, seed=seed, calibrate_dispersion=True,
        disable_tqdm=False,
    )
    return [h for h in history if "loss" in h and "train_loss" not in h]


def head_benchmark(response: int, out_dir: str, log=print) -> str:
    """Time and peak memory of one DPO fwd+bwd at Llama-3-8B head dims; returns the markdown table."""
    from .benchmark import Shape, measure, plot, report

    shape = Shape(pairs=1, response=response)
    log(f"\nOne DPO step at the Llama-3-8B head (d={shape.d}, V={shape.vocab:,}, {shape.valid_tokens} tokens, "
        f"fp32, {torch.get_num_threads()} threads); each case in a fresh process:")
    rows = []
    for case in ("gemm_floor", "naive", "fastpref", "fastpref_keep"):
        rows.append(measure(case, shape))
        log(f"  {case}: done")
    table = report(rows, shape)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "head_benchmark.png")
    plot(rows, path, f"DPO fwd+bwd at d={shape.d}, V={shape.vocab:,}, {shape.valid_tokens} tokens (CPU fp32)")
    log(table)
    log(f"plot: {path}")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastpref demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-pairs", type=int, default=8)
    parser.add_argument("--num-pairs", type=int, default=32)
    parser.add_argument("--sft-steps", type=int, default=30)
    parser.add_argument("--response", type=int, default=512, help="tokens per response in the head benchmark")
    parser.add_argument("--skip-benchmark", action="store_true")
    parser.add_argument("--out", default="out/demo")
    args = parser.parse_args(argv)
    history = train(args.steps, args.batch_pairs, args.num_pairs, args.sft_steps)
    first, last = history[0], history[-1]
    print(f"\nMallowsPO through FastPrefDPOTrainer: loss {first['loss']:.4f} -> {last['loss']:.4f}, "
          f"reward accuracy {first['rewards/accuracies']:.2f} -> {last['rewards/accuracies']:.2f}, "
          f"margins {first['rewards/margins']:+.3f} -> {last['rewards/margins']:+.3f}")
    if not args.skip_benchmark:
        head_benchmark(args.response, args.out)
