"""How the token-statistics op cuts its work: kept rows, forward chunks and backward tiles (pure functions).

The backward recomputes the logits of the rows the forward did not keep in tiles of
(row block x vocabulary slice). Per slice, the slice of grad_W is one GEMM over all of a block's rows,
so a bf16 / fp16 head needs a full-size fp32 accumulator for neither gradient: only an fp32
``[width, d]`` one when a slice sums over several row blocks (or over kept rows too), and an fp32
``[rows, d]`` one for grad_hidden when it sums over several slices. Per-device tile policies go here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_TILE_WIDTH = 512  # narrower vocabulary slices make the grad_W GEMMs inefficient
LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class BackwardTiles:
    """Tiles of the recomputed rows: ``block`` rows x ``width`` vocabulary columns, and the fp32 side
    accumulators a low-precision head needs (False for fp32 / fp64 heads, which accumulate in place)."""

    block: int
    width: int
    fp32_grad_hidden: bool
    fp32_grad_weight: bool


def kept_rows(rows: int, vocab: int, element_size: int, logits_budget: int, chunk_rows: int,
              ref_logits: bool) -> int:
    """How many leading rows keep their logits for the backward: whole chunks within ``logits_budget``
    bytes (policy and, with ``ref_logits``, reference logits), or all rows when they all fit."""
    per_row = vocab * element_size * (2 if ref_logits else 1)
    kept = min(rows, logits_budget // per_row)
    return kept if kept == rows else kept - kept % chunk_rows


def backward_tiles(rows: int, vocab: int, chunk_rows: int, dtype: torch.dtype, kept: int) -> BackwardTiles:
    """Tiles for the ``rows - kept`` recomputed rows holding about one forward chunk of logits each:
    a vocabulary slice over as many rows as fit (all of them, when they do)."""
    rest = rows - kept
    if rest <= 0:
        return BackwardTiles(block=0, width=vocab, fp32_grad_hidden=False, fp32_grad_weight=False)
    tile = chunk_rows * vocab
    width = min(vocab, max(tile // rest, MIN_TILE_WIDTH))
    block = min(rest, max(1, tile // width))
    low = dtype in LOW_PRECISION
    return BackwardTiles(
        block=block,
        width=width,
        fp32_grad_hidden=low and width < vocab,  # grad_hidden sums over the vocabulary slices
        fp32_grad_weight=low and (block < rest or kept > 0),  # a grad_W slice sums over row blocks / kept rows
    )


def spans(start: int, stop: int, step: int) -> list[tuple[int, int]]:
    """``[(start, start + step), ...]`` covering ``[start, stop)``."""
    return [(s, min(s + step, stop)) for s in range(start, stop, step)]


__all__ = ["BackwardTiles", "backward_tiles", "kept_rows", "spans"]
