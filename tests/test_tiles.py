"""The tile planner of the token-statistics op (fastpref.ops.tiles): pure functions, checked case by case."""

import pytest
import torch

from fastpref.ops.tiles import MIN_TILE_WIDTH, BackwardTiles, backward_tiles, kept_rows, spans


def test_spans_cover_the_range_in_order():
    assert spans(0, 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert spans(3, 3, 4) == []
    assert spans(5, 7, 10) == [(5, 7)]


@pytest.mark.parametrize("budget, ref, expected", [
    (0, False, 0),                    # recompute everything
    (10 * 100 * 4, False, 10),        # all 10 rows fit: keep them all
    (7 * 100 * 4, False, 4),          # 7 rows fit: whole chunks of 4 only
    (7 * 100 * 4 * 2, True, 4),       # reference logits count twice
    (3 * 100 * 4, False, 0),          # less than one chunk
])
def test_kept_rows(budget, ref, expected):
    assert kept_rows(10, 100, 4, budget, chunk_rows=4, ref_logits=ref) == expected


def test_all_rows_in_one_tile_when_they_fit():
    tiles = backward_tiles(rows=100, vocab=1000, chunk_rows=200, dtype=torch.bfloat16, kept=0)
    assert tiles == BackwardTiles(block=100, width=1000, fp32_grad_hidden=False, fp32_grad_weight=False)


def test_many_rows_get_vocabulary_slices_over_all_rows():
    """Rows beyond one chunk: slices of the vocabulary over every row, so each grad_W slice is one GEMM."""
    tiles = backward_tiles(rows=4096, vocab=128_256, chunk_rows=1024, dtype=torch.bfloat16, kept=0)
    assert tiles.block == 4096 and tiles.width == 1024 * 128_256 // 4096
    assert tiles.block * tiles.width <= 1024 * 128_256
    assert tiles.fp32_grad_hidden and not tiles.fp32_grad_weight  # grad_hidden sums over slices


def test_width_has_a_floor_then_rows_split_into_blocks():
    tiles = backward_tiles(rows=100_000, vocab=50_000, chunk_rows=64, dtype=torch.bfloat16, kept=0)
    assert tiles.width == MIN_TILE_WIDTH and tiles.block == 64 * 50_000 // MIN_TILE_WIDTH
    assert tiles.fp32_grad_hidden and tiles.fp32_grad_weight  # grad_W slices sum over row blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_precision_heads_accumulate_in_place(dtype):
    tiles = backward_tiles(rows=100_000, vocab=50_000, chunk_rows=64, dtype=dtype, kept=10)
    assert not tiles.fp32_grad_hidden and not tiles.fp32_grad_weight


def test_kept_rows_make_grad_weight_accumulate():
    """The kept rows' GEMM writes grad_W first; the recomputed slices add to it (in fp32 for bf16)."""
    tiles = backward_tiles(rows=1000, vocab=1000, chunk_rows=1000, dtype=torch.float16, kept=500)
    assert tiles.block == 500 and tiles.fp32_grad_weight and not tiles.fp32_grad_hidden


def test_nothing_to_recompute():
    assert backward_tiles(rows=8, vocab=100, chunk_rows=4, dtype=torch.bfloat16, kept=8).block == 0
