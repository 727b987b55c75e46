"""The running sequences' KV cache as one batch, so that one forward pass decodes them all.

Rows are left-padded to the longest: every row's newest entry sits in the last column, so one
decoding step appends one column for all. Padding is masked out (attention_mask 0), and each row
keeps its own position ids, so a row computes what it would alone. Sequences join with the
cache of their prefill (padded to the batch, or the batch padded to them); one that leaves is
cut out at once, and columns that only padding still uses are dropped with it.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

Layers = list[tuple[torch.Tensor, torch.Tensor]]


def layers_of(cache: DynamicCache) -> Layers:
    # Attention layers only: a model whose cache holds other kinds (linear attention, sliding
    # windows) is not batched this way.
    layers: Any = cache.layers
    return [(layer.keys, layer.values) for layer in layers]


class DecodeBatch:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rows: list[int] = []
        """The sequence id of each row."""
        self.layers: Layers = []
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)
        """[rows, columns]: 1 where a row has a real entry."""
        self.positions = torch.zeros(0, dtype=torch.long, device=device)
        """[rows]: the position id of each row's next token (its length so far)."""

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def columns(self) -> int:
        return int(self.mask.shape[1])

    @property
    def tokens(self) -> int:
        """Real entries held, padding excluded."""
        return int(self.positions.sum())

    def add(self, sequence_ids: list[int], layers: Layers, lengths: list[int]) -> None:
        """Sequences join with their prefill's cache: one row each, left-padded to its columns,
        `lengths` real entries per row."""
        width = int(layers[0][0].shape[2])
        real = torch.tensor(lengths, dtype=torch.long, device=self.device)[:, None]
        mask = (torch.arange(width, device=self.device) >= width - real).long()
        if self.rows:
            width = max(self.columns, width)
            layers = [
                (_cat(k0, k, width), _cat(v0, v, width))
                for (k0, v0), (k, v) in zip(self.layers, layers, strict=True)
            ]
            mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])
        self.layers, self.mask = layers, mask
        self.positions = torch.cat([self.positions, self.positions.new_tensor(lengths)])
        self.rows.extend(sequence_ids)

    def remove(self, sequence_ids: Collection[int]) -> None:
        """Cut out the rows of these sequences; drop the columns nobody uses any more."""
        keep = [i for i, sid in enumerate(self.rows) if sid not in sequence_ids]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, index)
        self.layers = [
            (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
            for k, v in self.layers
        ]

    def cache(self) -> DynamicCache:
        """A cache over these tensors for the next forward pass, which appends to it."""
        return cache_over(self.layers)

    def advanced(self, cache: DynamicCache) -> None:
        """After a decoding step: keep its grown cache, one more real column for every row."""
        self.layers = layers_of(cache)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        self.positions = self.positions + 1


def cache_over(layers: Layers) -> DynamicCache:
    """A cache holding these tensors as they are. (DynamicCache(ddp_cache_data=...) copies
    them into each layer: the whole batch's KV once more per step.)"""
    cache = DynamicCache()
    for keys, values in layers:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def _left_pad(tensor: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _cat(batch: torch.Tensor, rows: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, T, D] and [N, H, L, D] → [B + N, H, max(T, L), D], each left-padded."""
    return torch.cat([_left_pad(batch, width, dim=2), _left_pad(rows, width, dim=2)])


def left_padded(rows: list[tuple[int, ...]], width: int, device: torch.device) -> torch.Tensor:
    """Token ids [rows, width], each row right-aligned; -1 where a row has no token."""
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            out[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
    return out.to(device)
