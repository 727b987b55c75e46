"""Pooling and normalisation inside the inference service equal a plain loop-by-loop reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmserve.core.pooling import embed, pool

pytestmark = pytest.mark.timeout(10)
torch.set_num_threads(1)

LENGTHS = [5, 2, 3]


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(len(LENGTHS), max(LENGTHS), 8, generator=generator)
    mask = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.int64)
    for row, length in enumerate(LENGTHS):
        mask[row, :length] = 1
        hidden[row, length:] = 1e6  # padding must not leak into any vector
    return hidden, mask


def reference(hidden: torch.Tensor, mode: str, normalize: bool) -> np.ndarray:
    rows = []
    for row, length in enumerate(LENGTHS):
        tokens = hidden[row, :length].numpy().astype(np.float64)
        vector = tokens[0] if mode == "cls" else tokens.sum(axis=0) / length
        rows.append(vector / np.sqrt((vector**2).sum()) if normalize else vector)
    return np.stack(rows)


@pytest.mark.parametrize("mode", ["mean", "cls"])
@pytest.mark.parametrize("normalize", [True, False])
def test_embed_matches_reference(mode: str, normalize: bool) -> None:
    hidden, mask = batch()
    got = embed(hidden, mask, mode, normalize).numpy()
    np.testing.assert_allclose(got, reference(hidden, mode, normalize), rtol=1e-5, atol=1e-6)


def test_normalised_vectors_have_unit_length_from_half_precision() -> None:
    hidden, mask = batch()
    vectors = embed(hidden.clamp(max=100).to(torch.bfloat16), mask, "mean", normalize=True)
    assert vectors.dtype == torch.float32
    np.testing.assert_allclose(vectors.norm(dim=-1).numpy(), 1.0, rtol=1e-5)


def test_unknown_pooling_is_refused() -> None:
    hidden, mask = batch()
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        pool(hidden, mask, "max")
