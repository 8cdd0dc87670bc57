"""Running fastpref's TRL trainers next to TRL's own on tiny random Llamas (CPU, fp32), and unpaired data."""

from __future__ import annotations

import random
import tempfile

from integration_helpers import SPECIALS, frozen_copy, make_model, make_pairs, make_tokenizer


def trl_config(cls, **overrides):
    """A TRL (or fastpref) trainer config for a short deterministic CPU run, logging every step."""
    settings = dict(
        output_dir=tempfile.mkdtemp(prefix="fastpref-test-"), max_steps=4, learning_rate=1e-3,
        per_device_train_batch_size=4, logging_steps=1,
        save_strategy="no", report_to="none", seed=0, use_cpu=True, bf16=False, disable_tqdm=True,
    )
    settings.update(overrides)
    return cls(**settings)


def lora():
    """A LoRA config for the tiny Llama (its reference is the policy with the adapters disabled)."""
    import peft

    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def train(trainer_cls, config_cls, *, precompute: bool, dataset=None, vocab: int = 512, peft_config=None,
          eval_dataset=None, **overrides):
    """Train a fresh tiny Llama (a frozen copy as ``ref_model`` unless ``precompute`` or ``peft_config``);
    ``(trainer, step logs)``."""
    model = make_model(vocab)
    ref = None if precompute or peft_config is not None else frozen_copy(model)
    args = trl_config(config_cls, precompute_ref_log_probs=precompute, **overrides)
    extra = {} if peft_config is None else {"peft_config": peft_config}
    if eval_dataset is not None:
        extra["eval_dataset"] = eval_dataset
    trainer = trainer_cls(model, ref_model=ref, args=args, train_dataset=dataset or make_pairs(16, vocab),
                          processing_class=make_tokenizer(vocab), **extra)
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]


def make_unpaired(labels: list[bool], vocab: int = 512, seed: int = 0):
    """``prompt`` / ``completion`` / ``label`` texts (EOS-terminated completions), one row per label."""
    from datasets import Dataset

    rng = random.Random(seed)
    words = vocab - len(SPECIALS)

    def text(n: int) -> str:
        return " ".join(f"t{rng.randrange(words)}" for _ in range(n))

    rows = {"prompt": [], "completion": [], "label": []}
    for label in labels:
        rows["prompt"].append(text(rng.randint(2, 8)))
        rows["completion"].append(" " + text(rng.randint(1, 9)) + " </s>")
        rows["label"].append(bool(label))
    return Dataset.from_dict(rows)
