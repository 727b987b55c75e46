"""The model's side of generation, run in an executor thread: prefill the prompts admitted in
one turn together, or decode one step for every row of the batch. Returns float32 logits on the
CPU (the last position's); the scheduler samples from them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from fmserve.errors import Overloaded
from services.inference.generation.batch import (
    DecodeBatch,
    Layers,
    cache_over,
    layers_of,
    left_padded,
)
from services.inference.loading import Placement


@dataclass(frozen=True)
class Step:
    logits: torch.Tensor
    """[rows, vocab] float32 on the CPU."""
    seconds: float


@dataclass(frozen=True)
class Prompt:
    """A prompt to prefill, and the cached KV of its first tokens when a prefix was reused."""

    ids: tuple[int, ...]
    prefix: Layers | None = None
    """Per layer, keys and values [1, heads, cached, dim] of `ids[:cached]`."""

    @property
    def cached(self) -> int:
        return 0 if self.prefix is None else int(self.prefix[0][0].shape[2])


@dataclass(frozen=True)
class Prefilled:
    step: Step
    layers: Layers
    """[rows, heads, columns, dim], each row's prompt left-padded, contiguous to the right."""
    lengths: list[int]


class Engine:
    def __init__(self, module: Any, placement: Placement) -> None:
        self.module = module
        self.placement = placement
        self.config = module.config
        self.vocab_size = int(self.config.vocab_size)
        self.batch = DecodeBatch(placement.device)

    def prefill(self, prompts: list[Prompt]) -> Prefilled:
        """The prompts' forward pass together. Each row is left-padded: its cached prefix (if
        any) to the longest prefix, its uncached rest to the longest rest; the mask hides the
        padding and each row has its own positions, so a row computes what it would alone. One
        prompt without a prefix is run as is: exactly what `generate` computes."""
        started = time.perf_counter()
        device = self.placement.device
        width = max(len(p.ids) - p.cached for p in prompts)
        ids = left_padded([p.ids[p.cached :] for p in prompts], width, device)
        mask = (ids >= 0).long()
        ids = ids.clamp(min=0)
        cached = torch.tensor([p.cached for p in prompts], dtype=torch.long, device=device)
        positions = (mask.cumsum(1) - 1).clamp(min=0) + cached[:, None]
        cache = self._past(prompts)
        if cache is None:
            cache, past_mask = DynamicCache(config=self.config), mask[:, :0]
        else:
            columns = int(cached.max())
            past_mask = (torch.arange(columns, device=device) >= columns - cached[:, None]).long()
        with _translated(len(prompts)), torch.inference_mode():
            out = self.module(
                input_ids=ids,
                attention_mask=torch.cat([past_mask, mask], dim=1),
                position_ids=None if len(prompts) == 1 and not past_mask.shape[1] else positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits[:, -1].float().cpu()
        layers = layers_of(cache)
        if past_mask.shape[1]:  # the prefix's padding sits between columns: pack each row right
            layers = _packed(layers, torch.cat([past_mask, mask], dim=1))
        lengths = [len(p.ids) for p in prompts]
        return Prefilled(Step(logits, time.perf_counter() - started), layers, lengths)

    def _past(self, prompts: list[Prompt]) -> DynamicCache | None:
        """The reused prefixes as one left-padded cache, or None when no prompt has one."""
        if all(p.prefix is None for p in prompts):
            return None
        columns = max(p.cached for p in prompts)
        rows = [p.prefix or self._nothing(prompts) for p in prompts]
        return cache_over(
            [
                (
                    _pad_cat([row[i][0] for row in rows], columns),
                    _pad_cat([row[i][1] for row in rows], columns),
                )
                for i in range(len(rows[0]))
            ]
        )

    @staticmethod
    def _nothing(prompts: list[Prompt]) -> Layers:
        """An empty prefix shaped like the others (no columns)."""
        some = next(p.prefix for p in prompts if p.prefix is not None)
        return [(k[:, :, :0], v[:, :, :0]) for k, v in some]

    def decode(self, last_tokens: list[int]) -> Step:
        """One step for every row: each row's last token in, the next token's logits out."""
        started = time.perf_counter()
        batch = self.batch
        device = self.placement.device
        ids = torch.tensor(last_tokens, dtype=torch.long, device=device)[:, None]
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch), 1)], dim=1)
        cache = batch.cache()
        with _translated(len(batch)), torch.inference_mode():
            out = self.module(
                input_ids=ids,
                attention_mask=mask,
                position_ids=batch.positions[:, None],
                cache=cache,  # grows by one column, in place
                use_cache=True,
            )
            logits = out.logits[:, -1].float().cpu()
        batch.advanced(cache)
        return Step(logits, time.perf_counter() - started)


def _pad_cat(tensors: list[torch.Tensor], columns: int) -> torch.Tensor:
    """[1, H, n_i, D] each → [rows, H, columns, D], each left-padded with zeros."""
    out = tensors[0].new_zeros(len(tensors), tensors[0].shape[1], columns, tensors[0].shape[3])
    for row, tensor in enumerate(tensors):
        if tensor.shape[2]:
            out[row, :, columns - tensor.shape[2] :] = tensor[0]
    return out


def _packed(layers: Layers, mask: torch.Tensor) -> Layers:
    """Each row's real columns moved to the right end, in order, zeros to their left."""
    lengths = mask.sum(1)
    width = int(lengths.max())
    # a stable sort puts the padding first and keeps the real columns in order
    order = torch.sort(mask, dim=1, stable=True).indices[:, -width:]
    keep = (torch.arange(width, device=mask.device) >= width - lengths[:, None])[:, None, :, None]
    packed = []
    for keys, values in layers:
        index = order[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
        packed.append(
            (
                torch.where(keep, keys.gather(2, index), 0.0),
                torch.where(keep, values.gather(2, index), 0.0),
            )
        )
    return packed


@contextmanager
def _translated(rows: int) -> Iterator[None]:
    """A device out of memory is RESOURCE_EXHAUSTED for the sequences of that pass."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise Overloaded(
            f"the model ran out of memory decoding {rows} sequences; retry shortly, "
            "or lower [generation] max_batch_tokens"
        ) from exc
