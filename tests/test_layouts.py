"""The layouts (fastpref.layouts): row masks, token counts, argument ownership, per-row rewards."""

from __future__ import annotations

import pytest
import torch

import fastpref
from fastpref.layouts import LAYOUT_ARGUMENTS, LAYOUT_CLASSES, LAYOUTS, ListLossResult, LossResult, make_layout, \
    token_counts

LABELS = torch.zeros(6, 3, dtype=torch.long)


def test_names_and_arguments():
    assert LAYOUTS == ("pairs", "groups", "unpaired") == fastpref.losses.LAYOUTS
    assert {fastpref.get_loss(name).layout for name in fastpref.available_losses()} == set(LAYOUTS)
    owned = [name for cls in LAYOUT_CLASSES.values() for name in cls.arguments]
    assert len(owned) == len(set(owned))  # each argument belongs to one layout
    assert set(LAYOUT_ARGUMENTS) == set(owned) | {"ref_logps"}


def test_row_masks():
    pairs = make_layout("pairs", "dpo", 6, LABELS, {})
    assert pairs.chosen_rows.tolist() == [True] * 3 + [False] * 3
    assert pairs.rejected_rows.tolist() == [False] * 3 + [True] * 3
    groups = make_layout("groups", "pro", 6, LABELS, {"group_sizes": [4, 2],
                                                      "scores": torch.tensor([0.1, 0.7, 0.7, 0.2, 0.0, 0.5])})
    assert groups.chosen_rows.tolist() == [False, True, False, False, False, True]  # first of the tied best
    assert groups.rejected_rows.tolist() == [True, False, True, True, True, False]
    unpaired = make_layout("unpaired", "kto", 6, LABELS, {"desirable": torch.tensor([1, 0, 0, 1]), "num_kl_rows": 2})
    assert unpaired.chosen_rows.tolist() == [True, False, False, True, False, False]
    assert unpaired.rejected_rows.tolist() == [False, True, True, False, False, False]
    assert unpaired.no_grad_from == 4


def test_token_counts_honour_the_rows_not_a_half_split():
    num_tokens = torch.tensor([3, 5, 2, 7, 1, 4])
    chosen = torch.tensor([False, True, False, False, False, True])
    counts = token_counts(num_tokens, chosen, ~chosen)
    assert {k: int(v) for k, v in counts.items()} == {"all": 22, "chosen": 9, "rejected": 13}
    kl_rows = torch.tensor([True, False, False, True, False, False]), torch.tensor([False, True, True, False, False, False])
    assert {k: int(v) for k, v in token_counts(num_tokens, *kl_rows).items()} == {"all": 17, "chosen": 10,
                                                                                 "rejected": 7}


def test_row_rewards_in_row_order():
    pairs = make_layout("pairs", "dpo", 6, LABELS, {})
    rewards = pairs.row_rewards(LossResult(torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5, 6])))
    assert rewards.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    groups = make_layout("groups", "pro", 6, LABELS, {"group_sizes": [4, 2]})
    padded = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0]])
    assert groups.row_rewards(ListLossResult(torch.zeros(2), padded)).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


@pytest.mark.parametrize("layout, loss, inputs, arg", [
    ("pairs", "dpo", {"group_sizes": [3, 3]}, "group_sizes"),
    ("pairs", "dpo", {"desirable": torch.ones(6, dtype=torch.bool)}, "desirable"),
    ("groups", "pro", {"group_sizes": [3, 3], "ref_chosen_logps": torch.zeros(3)}, "ref_chosen_logps"),
    ("unpaired", "kto", {"desirable": torch.ones(6, dtype=torch.bool), "scores": torch.zeros(6)}, "scores"),
    ("pairs", "dpo", {"ref_logps": torch.zeros(6), "ref_chosen_logps": torch.zeros(3),
                      "ref_rejected_logps": torch.zeros(3)}, "ref_logps"),
])
def test_arguments_of_another_layout_are_refused(layout, loss, inputs, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        make_layout(layout, loss, 6, LABELS, inputs)
