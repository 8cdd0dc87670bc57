"""Tiny random-init Llamas, an in-process word-level tokenizer and procedural preference data for the
integration tests (no downloads)."""

from __future__ import annotations

import os
import random
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

SPECIALS = ["<pad>", "<unk>", "</s>"]


def make_tokenizer(vocab: int = 512):
    """A ``PreTrainedTokenizerFast`` over words ``t0 .. t{vocab-4}`` and ``<pad> <unk> </s>``, split on spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + [f"t{i}" for i in range(vocab - len(SPECIALS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def make_model(vocab: int = 512, hidden: int = 64, layers: int = 2, seed: int = 0, bias: bool = False):
    """A random-init ``LlamaForCausalLM`` (untied head, optional head bias)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=2, bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    if bias:
        old = model.lm_head
        model.lm_head = torch.nn.Linear(hidden, vocab, bias=True)
        with torch.no_grad():
            model.lm_head.weight.copy_(old.weight)
            model.lm_head.bias.normal_(0, 0.5)
    return model


def _words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"t{rng.randrange(vocab - len(SPECIALS))}" for _ in range(n))


def make_pairs(n: int = 16, vocab: int = 512, seed: int = 0):
    """``datasets.Dataset`` of ``prompt`` / ``chosen`` / ``rejected`` texts of varied lengths (EOS-terminated)."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        rows["prompt"].append(_words(rng, rng.randint(2, 8), vocab))
        rows["chosen"].append(" " + _words(rng, rng.randint(1, 9), vocab) + " </s>")
        rows["rejected"].append(" " + _words(rng, rng.randint(1, 9), vocab) + " </s>")
    return Dataset.from_dict(rows)


def make_lists(n: int = 8, k: int = 3, vocab: int = 512, seed: int = 0):
    """``prompt`` / ``completions`` (K texts) / ``scores`` (K floats) for list losses."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = {"prompt": [], "completions": [], "scores": []}
    for _ in range(n):
        rows["prompt"].append(_words(rng, rng.randint(2, 6), vocab))
        rows["completions"].append([" " + _words(rng, rng.randint(1, 7), vocab) + " </s>" for _ in range(k)])
        rows["scores"].append([rng.uniform(0, 10) for _ in range(k)])
    return Dataset.from_dict(rows)


def pair_batches(count: int, vocab: int = 256, seed: int = 5) -> list[dict]:
    """``count`` collated pair batches (2 pairs, 10 tokens, 4 prompt tokens, ragged padding, precomputed
    reference log-probs): one per rank of the distributed tests."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (4, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        mask[3, 8:] = 0
        completion = mask.clone()
        completion[:, :4] = 0
        batches.append({"input_ids": ids, "attention_mask": mask, "completion_mask": completion,
                        "ref_chosen_logps": -torch.rand(2, generator=g) * 30,
                        "ref_rejected_logps": -torch.rand(2, generator=g) * 30})
    return batches


def frozen_copy(model):
    import copy

    return copy.deepcopy(model).eval().requires_grad_(False)


def assert_max_diff(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol, f"{what}: max |diff| {err:.3g} > {tol}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank, world, port, fn, args, errors):
    import traceback

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        fn(rank, *args)
        dist.barrier()  # no rank leaves while another still runs collectives
    except BaseException:  # reported to the parent, which fails the test with the traceback
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()
    # Leave without interpreter finalization: gloo's (and DeepSpeed's) worker threads can still hold
    # tensors then, and freeing them during shutdown aborts the process (SIGABRT) after a passing run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, *args, world: int = 2) -> None:
    """Run ``fn(rank, *args)`` in ``world`` fresh processes joined by a gloo group (the usual torch.distributed
    environment variables set, so DeepSpeed and accelerate see it); a rank's exception fails the test."""
    import pytest
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_spawned, args=(world, free_port(), fn, args, errors), nprocs=world, start_method="spawn")
    except mp.ProcessRaisedException as err:
        pytest.fail(errors.get() if not errors.empty() else str(err))
