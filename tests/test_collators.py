"""The integration collators: extra columns are required, not dropped; K responses per prompt keep every
response scorable under ``max_length``; padding to a multiple."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("datasets")

from fastpref.integrations.collators import ListwiseCollator, WithColumns, prepare_listwise_dataset  # noqa: E402


def _pair_collate(examples):
    return {"input_ids": torch.tensor([[1, 2]] * len(examples))}


def test_with_columns_adds_columns_and_refuses_missing_ones():
    collate = WithColumns(_pair_collate, ["soft_labels"])
    batch = collate([{"soft_labels": 0.25}, {"soft_labels": 0.75}])
    assert torch.equal(batch["soft_labels"], torch.tensor([0.25, 0.75]))
    with pytest.raises(ValueError, match="'soft_labels' is missing.*soft_label"):
        collate([{"soft_label": 0.25}])
    assert WithColumns(collate, ["ties"]).columns == ["ties"]  # re-wrapping replaces, never nests


def _lists():
    return [
        {"prompt_ids": [5, 6, 7], "completion_ids": [[8, 9], [10], [11, 12, 13]], "scores": [1.0, 3.0, 2.0]},
        {"prompt_ids": [5], "completion_ids": [[14], [15, 16]], "scores": [0.0, 1.0]},
    ]


def test_listwise_collator_layout_and_padding():
    batch = ListwiseCollator(pad_token_id=0, pad_to_multiple_of=4)(_lists())
    assert batch["input_ids"].shape == (5, 8)  # longest 6 tokens, rounded up to a multiple of 4
    assert batch["group_sizes"].tolist() == [3, 2]
    assert batch["input_ids"][2].tolist() == [5, 6, 7, 11, 12, 13, 0, 0]
    assert batch["completion_mask"][2].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    assert batch["attention_mask"].sum(1).tolist() == [5, 4, 6, 2, 3]
    assert batch["scores"].tolist() == [1.0, 3.0, 2.0, 0.0, 1.0]


def test_listwise_collator_refuses_a_response_left_without_tokens():
    with pytest.raises(ValueError, match="no token left.*max_length=3"):
        ListwiseCollator(max_length=3)(_lists())
    with pytest.raises(ValueError, match="no token left"):
        ListwiseCollator()([{"prompt_ids": [1, 2], "completion_ids": [[3], []]}])
    batch = ListwiseCollator(max_length=4)(_lists())  # every response keeps at least one token
    assert batch["completion_mask"].sum(1).min() >= 1 and batch["input_ids"].shape[1] == 4


def test_prepare_listwise_dataset_drops_what_truncation_would_empty():
    from datasets import Dataset

    data = Dataset.from_list(_lists())
    with pytest.warns(UserWarning, match="dropped 1 of 2"):
        kept = prepare_listwise_dataset(data, None, max_length=3)
    assert kept["prompt_ids"] == [[5]]
    ListwiseCollator(max_length=3)(list(kept))  # no longer fails
    assert len(prepare_listwise_dataset(data, None, max_length=None)) == 2


@pytest.mark.parametrize("key", ["scores", "ref_logps"])
def test_listwise_collator_refuses_per_response_values_that_do_not_line_up(key):
    """Two examples of 3 responses with 4 and 2 values flattened to 6: every value scored the wrong response."""
    examples = [{"prompt_ids": [5, 6], "completion_ids": [[7], [8], [9]], key: [1.0, 2.0, 3.0, 4.0]},
                {"prompt_ids": [5, 6], "completion_ids": [[7], [8], [9]], key: [1.0, 2.0]}]
    with pytest.raises(ValueError, match=f"`{key}` of example 0 of the batch has 4 values for its 3 responses"):
        ListwiseCollator()(examples)
    # given for some examples only: the others would silently count as ranked best first (or lose their reference)
    partial = [{"prompt_ids": [5], "completion_ids": [[7], [8]]},
               {"prompt_ids": [5], "completion_ids": [[7], [8]], key: [1.0, 2.0]}]
    with pytest.raises(ValueError, match=rf"`{key}` is given for some examples of the batch but not for examples \[0"):
        ListwiseCollator()(partial)


def test_list_tokenisation_keeps_the_tokenizers_special_tokens_as_trl_does():
    """Lists were tokenised without special tokens: a BOS-adding tokenizer (Llama's) trained list losses on
    prompts without the BOS that TRL's pair path (and inference) put there."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from fastpref.integrations.collators import tokenize_listwise

    words = ["<pad>", "<unk>", "</s>", "<s>"] + [f"t{i}" for i in range(20)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                  bos_token="<s>")
    out = tokenize_listwise({"prompt": "t1 t2", "completions": [" t5", " t6 t7"]}, tok, eos_token="</s>")
    assert out["prompt_ids"] == tok("t1 t2")["input_ids"] == [3, 5, 6]
    assert out["completion_ids"] == [[9, 2], [10, 11, 2]]
