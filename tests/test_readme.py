"""The README's code runs: every Python block parses, and the API examples (levels 1-3 and the fused
front door) run as written on small random inputs, with the names they use defined here."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest
import torch

import fastpref
from oracle import pack

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _section(text: str, title: str) -> str:
    start = text.index(f"\n### {title}")
    end = re.compile(r"\n#{2,3} ").search(text, start + 1)  # the next heading (code comments have one #)
    return text[start: end.start() if end else len(text)]


def _blocks(text: str) -> list[str]:
    return BLOCK.findall(text)


@pytest.mark.parametrize("path", [ROOT / "README.md", *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_parse(path):
    blocks = _blocks(path.read_text())
    for block in blocks:
        ast.parse(block)  # a SyntaxError names the line
    if path == ROOT / "README.md":
        assert len(blocks) >= 8


def _inputs(pairs=4, seq=10, d=16, vocab=48):
    """The names the API examples use, for ``2 * pairs`` rows ``[chosen; rejected]``."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * pairs, seq, d, generator=g, requires_grad=True)
    input_labels = torch.randint(0, vocab, (2 * pairs, seq), generator=g)
    input_labels[:, :3] = -100  # the prompt
    input_labels[1, -2:] = -100  # padding
    labels = fastpref.shift_labels(input_labels)
    packed_hidden, packed_labels, _, cu = pack(hidden.detach(), labels)
    ids = torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff())[None]
    B = pairs // 2  # for the group example: 2 prompts x 4 scored responses over the same 2 * pairs rows
    seq_logps = -torch.rand(4, pairs, generator=g) * 20
    entropies = torch.rand(2, pairs, generator=g) * 3
    return dict(
        fastpref=fastpref, input_labels=input_labels, hidden=hidden, labels=labels, V=vocab, B=B,
        W=torch.randn(vocab, d, generator=g, requires_grad=True),
        ref_hidden=torch.randn(2 * pairs, seq, d, generator=g), ref_W=torch.randn(vocab, d, generator=g),
        packed_hidden=packed_hidden, packed_labels=packed_labels, cu=cu, ids=ids,
        policy_chosen_logps=seq_logps[0], policy_rejected_logps=seq_logps[1],
        ref_chosen_logps=seq_logps[2], ref_rejected_logps=seq_logps[3],
        pc_mean=seq_logps[0] / 7, pr_mean=seq_logps[1] / 7, rc_mean=seq_logps[2] / 7, rr_mean=seq_logps[3] / 7,
        ref_chosen_mean_entropy=entropies[0], ref_rejected_mean_entropy=entropies[1],
        scores=torch.rand(2 * pairs, generator=g), sft_labels=labels.clone(),  # one score per response
    )


@pytest.mark.parametrize("title", ["Level 1", "Level 2", "Level 3", "Fused front door"])
def test_api_examples_run(title):
    blocks = _blocks(_section(README, title))
    assert blocks, f"no Python block under '### {title}'"
    namespace = _inputs()
    for block in blocks:
        exec(compile(block, f"README.md ({title})", "exec"), namespace)
    if title == "Level 1":
        stats = namespace["stats"]
        assert stats.logp.shape == namespace["labels"].shape and stats.kl is not None
    if title == "Level 2":
        assert namespace["seq"].sum_logp.shape == (len(namespace["cu"]) - 1,)
    if title == "Level 3":
        assert torch.isfinite(namespace["loss"]).all() and torch.isfinite(namespace["losses"]).all()
    if title == "Fused front door":
        assert namespace["W"].grad is not None and torch.isfinite(namespace["out"].loss)
