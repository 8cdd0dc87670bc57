"""Peak memory of one DPO step through TRL's DPOTrainer vs FastPrefDPOTrainer (CPU, peak RSS).

A Llama-3-8B-shaped model truncated to a few layers (d = 4096, V = 128,256, intermediate 14,336,
GQA 32/8 heads, bf16 weights, random init), one preference pair of ``--prompt`` + ``--completion``
tokens per response, reference log-probs precomputed (no reference model in memory). Each variant runs
in its own subprocess and measures the forward + backward of the loss of one batch
(``trainer.compute_loss`` then ``backward``; the optimizer, identical for all, is left out):

* ``trl_materialised`` — TRL's ``DPOTrainer`` with its fused head replaced by the eager path older TRL
  (<= 0.28) and most pipelines use: full ``[tokens, V]`` logits, upcast to fp32, ``log_softmax``;
* ``trl_fused`` — TRL 1.16's ``DPOTrainer`` as shipped (its own chunked fused LM head);
* ``fastpref`` — ``FastPrefDPOTrainer`` (fastpref's fused op), same loss and metrics.

Parameter gradients are allocated before the step (steady state: a later micro-step, or DDP/FSDP's
persistent gradient buffers), so the step's own memory is activations plus the LM head's transients.
Columns: peak RSS of the process (weights + gradients + step); the peak above the RSS just before the
step (sampled every 2 ms) during the forward (loss included) and over forward + backward; the step's
wall time; the loss (equal for all). On CUDA: peak allocated memory and its rise over the step.

    python benchmarks/trl_memory.py --dtype float32          # CPUs without bf16 GEMMs (minutes on 2 cores)
    python benchmarks/trl_memory.py                          # bf16 weights (needs AVX512-BF16/AMX to be quick)
    python benchmarks/trl_memory.py --device cuda            # on a GPU: peak allocated memory instead of RSS
    python benchmarks/trl_memory.py --small                  # d=256, V=32,000: a quick check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import types

VARIANTS = ("trl_materialised", "trl_fused", "fastpref")


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _PeakSampler:
    """Highest RSS seen by a background thread while the ``with`` block runs."""

    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=32 if args.hidden >= 4096 else 8,
        num_key_value_heads=8 if args.hidden >= 4096 else 2, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, bos_token_id=None,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # Drawn where the model runs: 1.5B parameters initialised on the CPU cost ~15 s before a GPU step.
    model = model.to_empty(device=args.device).to(getattr(torch, args.dtype))
    generator = torch.Generator(device=args.device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.fill_(1.0)
            else:
                for rows in param.view(param.shape[0], -1).split(4096):
                    rows.copy_(torch.randn(rows.shape, generator=generator, device=args.device) * 0.02)
    # Buffers (rotary inverse frequencies) are not parameters: rebuild that module.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.to(args.device)


def _tokenizer(vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "</s>"] + [f"t{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def _dataset(args):
    import random

    from datasets import Dataset

    rng = random.Random(0)

    def words(n):
        return " ".join(f"t{rng.randrange(args.vocab - 3)}" for _ in range(n))

    n = args.pairs
    return Dataset.from_dict({
        "prompt": [words(args.prompt) for _ in range(n)],
        "chosen": [" " + words(args.completion - 1) + " </s>" for _ in range(n)],
        "rejected": [" " + words(args.completion - 1) + " </s>" for _ in range(n)],
    })


def _materialise(model):
    """Replace TRL's fused head by the eager path: full logits, fp32 log-softmax (TRL <= 0.28 and friends)."""
    import torch

    hf_forward = type(model).forward

    def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        out = hf_forward(self, *args, **kwargs)
        if not fused_lm_head:
            return out
        logits = out.logits[:, :-1].float()
        target = labels[:, 1:]
        mask = target != -100
        logp = logits.log_softmax(-1)
        log_probs = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * mask
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1)
            mean_logits = logits.mean(-1)
            is_top1 = logits.argmax(-1) == target
        return types.SimpleNamespace(log_probs=log_probs, entropy=entropy, mean_logits=mean_logits, is_top1=is_top1,
                                     log_sum_sq_probs=None, aux_loss=None, loss=None)

    model.forward = types.MethodType(forward, model)


def run_variant(args) -> dict:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.manual_seed(0)
    from trl import DPOConfig, DPOTrainer

    from fastpref.integrations.trl import FastPrefDPOConfig, FastPrefDPOTrainer

    model = _model(args)
    fastpref = args.variant == "fastpref"
    config_cls, trainer_cls = (FastPrefDPOConfig, FastPrefDPOTrainer) if fastpref else (DPOConfig, DPOTrainer)
    config = config_cls(output_dir="/tmp/fastpref-trl-memory", per_device_train_batch_size=args.pairs,
                        report_to="none",
                        use_cpu=args.device == "cpu", bf16=False, precompute_ref_log_probs=True,
                        gradient_checkpointing=False,
                        disable_tqdm=True, save_strategy="no", max_length=None)
    trainer = trainer_cls(model, args=config, train_dataset=_dataset(args), processing_class=_tokenizer(args.vocab))
    if args.variant == "trl_materialised":
        _materialise(trainer.model)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    if args.device == "cuda":  # GPU: the allocator's peak instead of the process RSS
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated()
        step_peak = peak - before
    else:
        import resource

        # Steady state (a micro-step after the first, or persistent DDP/FSDP gradient buffers): the
        # gradients exist before the step, so what the step adds is activations and the head's transients.
        for param in trainer.model.parameters():
            param.grad = torch.zeros_like(param)
        before = _rss()
        start = time.perf_counter()
        with _PeakSampler() as total:
            with _PeakSampler() as forward:
                loss = trainer.compute_loss(trainer.model, batch)
            loss.backward()
        seconds = time.perf_counter() - start
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, total.peak)
        step_peak = total.peak - before
        forward_peak = forward.peak - before
        return {"variant": args.variant, "peak_rss": peak, "step_peak": step_peak, "forward_peak": forward_peak,
                "seconds": seconds, "loss": float(loss), "tokens": int(batch["attention_mask"].sum())}
    return {"variant": args.variant, "peak_rss": peak, "step_peak": step_peak, "forward_peak": float("nan"),
            "seconds": seconds, "loss": float(loss), "tokens": int(batch["attention_mask"].sum())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant here (internal)")
    parser.add_argument("--small", action="store_true", help="d=256, V=32,000, intermediate 512: a quick check")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=1, help="preference pairs in the batch")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--completion", type=int, default=384, help="tokens per response (EOS included)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="weights (CPUs without AVX512-BF16 run bf16 GEMMs ~100x slower: use float32 there)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: peak allocated GPU memory")
    args = parser.parse_args(argv)
    args.hidden, args.vocab, args.intermediate = (256, 32000, 512) if args.small else (4096, 128256, 14336)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--layers", str(args.layers), "--pairs",
               str(args.pairs), "--prompt", str(args.prompt), "--completion", str(args.completion),
               "--dtype", args.dtype, "--device", args.device] + (["--small"] if args.small else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:  # e.g. killed by the kernel's OOM killer (-9): reported as a row
            print(f"{variant} failed (exit {done.returncode}):\n{done.stderr[-1500:]}", file=sys.stderr)
            rows.append({"variant": variant, "failed": done.returncode})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    gib = 2**30
    tokens = next((row["tokens"] for row in rows if "tokens" in row), 0)
    memory = "peak RSS GiB" if args.device == "cpu" else "peak alloc GiB"
    print(f"one DPO step (forward+backward), d={args.hidden}, V={args.vocab}, {args.layers} layers, {args.dtype} "
          f"weights, {args.device}; {args.pairs} pair(s) x {args.prompt}+{args.completion} tokens "
          f"({tokens} tokens in the batch)")
    print(f"{'variant':<18} {memory:>14} {'fwd over pre-step GiB':>22} {'fwd+bwd over pre-step GiB':>26} "
          f"{'step s':>7} {'loss':>7}")
    for row in rows:
        if "failed" in row:
            print(f"{row['variant']:<18} failed (exit {row['failed']}; -9: killed, out of memory)")
            continue
        print(f"{row['variant']:<18} {row['peak_rss'] / gib:>14.2f} {row['forward_peak'] / gib:>22.2f} "
              f"{row['step_peak'] / gib:>26.2f} {row['seconds']:>7.1f} {row['loss']:>7.4f}")


if __name__ == "__main__":
    main()
