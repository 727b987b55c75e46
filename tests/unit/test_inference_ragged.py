"""The tensor contract's two forms: ragged and padded requests split into the same sequences,
batches pad to their longest sequence, and per-token answers go back in the request's form."""

from __future__ import annotations

import numpy as np
import pytest

from fmserve.errors import InvalidInput
from services.inference.ragged import Layout, join, pad, split_padded, split_ragged

pytestmark = pytest.mark.timeout(10)

SEQUENCES = [np.array([101, 7, 8, 102]), np.array([101, 102]), np.array([101, 5, 102])]


def as_list(sequences: list[np.ndarray]) -> list[list[int]]:
    return [s.tolist() for s in sequences]


def test_ragged_splits_at_lengths() -> None:
    ids = np.concatenate(SEQUENCES)
    sequences, layout = split_ragged(ids, np.array([4, 2, 3], dtype=np.int32))
    assert as_list(sequences) == as_list(SEQUENCES)
    assert layout.mask is None


def test_padded_keeps_masked_tokens_wherever_they_are() -> None:
    ids, mask = pad(SEQUENCES, pad_id=0)
    sequences, layout = split_padded(ids, mask)
    assert as_list(sequences) == as_list(SEQUENCES)
    # left padding works too: only the mask says where the tokens are
    left_ids, left_mask = ids[:, ::-1].copy(), mask[:, ::-1].copy()
    reversed_back = [s[::-1] for s in split_padded(left_ids, left_mask)[0]]
    assert as_list(reversed_back) == as_list(SEQUENCES)
    assert layout.mask is not None and layout.mask.dtype == bool


def test_padded_without_mask_takes_every_token() -> None:
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    sequences, _ = split_padded(ids)
    assert as_list(sequences) == [[1, 2, 3], [4, 5, 6]]


def test_pad_right_pads_to_the_longest() -> None:
    ids, mask = pad(SEQUENCES, pad_id=9)
    assert ids.tolist() == [[101, 7, 8, 102], [101, 102, 9, 9], [101, 5, 102, 9]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert ids.dtype == mask.dtype == np.int64


def test_join_per_sequence_stacks() -> None:
    outputs = [np.full(2, i, dtype=np.float32) for i in range(3)]
    assert join(outputs, Layout(), per_token=False).shape == (3, 2)


def test_join_per_token_ragged_concatenates_and_padded_scatters() -> None:
    outputs = [np.full((len(s), 2), i + 1, dtype=np.float32) for i, s in enumerate(SEQUENCES)]
    assert join(outputs, Layout(), per_token=True).shape == (9, 2)
    _, mask = pad(SEQUENCES, 0)
    padded = join(outputs, Layout(mask.astype(bool)), per_token=True)
    assert padded.shape == (3, 4, 2)
    assert padded[1, :, 0].tolist() == [2, 2, 0, 0]  # zeros where the request had padding


@pytest.mark.parametrize(
    ("ids", "lengths", "message"),
    [
        (np.arange(5), np.array([2, 2]), "sum to 4"),
        (np.arange(5), np.array([5, 0]), "at least one token"),
        (np.arange(6).reshape(2, 3), np.array([3, 3]), "ragged form"),
        (np.arange(0), np.array([], dtype=np.int32), "no sequences"),
    ],
)
def test_ragged_refuses_inconsistent_tensors(
    ids: np.ndarray, lengths: np.ndarray, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        split_ragged(ids, lengths)


@pytest.mark.parametrize(
    ("ids", "mask", "message"),
    [
        (np.arange(4), None, r"\[B, T\]"),
        (np.ones((2, 3)), np.ones((2, 2)), "must match"),
        (np.ones((2, 3)), np.array([[1, 1, 0], [0, 0, 0]]), "at least one token"),
        (np.ones((1, 2)), np.array([[1, 2]]), "0 or 1"),
    ],
)
def test_padded_refuses_inconsistent_tensors(
    ids: np.ndarray, mask: np.ndarray | None, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        split_padded(ids, mask)


def test_ragged_lengths_may_come_as_declared_one_per_batch_item() -> None:
    # ModelConfig declares lengths dims [1], so tools that build inputs from it send [B, 1]
    ids = np.concatenate(SEQUENCES)
    column = np.array([[4], [2], [3]], dtype=np.int32)
    assert as_list(split_ragged(ids, column)[0]) == as_list(SEQUENCES)
    with pytest.raises(InvalidInput, match=r"lengths shape \[B\] or \[B, 1\]"):
        split_ragged(ids, np.array([[4, 2, 3]], dtype=np.int32))
