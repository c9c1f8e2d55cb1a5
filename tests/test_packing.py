"""Packing raw text into fixed-length blocks for plain-text language modeling."""

import pytest
from datasets import Dataset

from hf_distill.data import pack_dataset


def test_blocks_hold_the_stream_in_order_with_separators():
    rows = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]], "text": ["a", "b", "c"]})
    packed = pack_dataset(rows, 4, separator_id=0)
    stream = [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 10, 0]
    assert packed["input_ids"] == [stream[0:4], stream[4:8], stream[8:12]]  # the 13th token is dropped
    assert packed["labels"] == packed["input_ids"]  # every token is trained
    assert all(mask == [1] * 4 for mask in packed["attention_mask"])
    assert packed.column_names == ["input_ids", "attention_mask", "labels"]


def test_keeping_the_short_tail():
    rows = Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5]]})
    assert pack_dataset(rows, 2, drop_last=False)["input_ids"] == [[1, 2], [3, 4], [5]]


def test_too_short_blocks_are_refused():
    with pytest.raises(ValueError, match="max_length=1"):
        pack_dataset(Dataset.from_dict({"input_ids": [[1, 2]]}), 1)
