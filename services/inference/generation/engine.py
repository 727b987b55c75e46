"""The model's side of generation, run in an executor thread: prefill one prompt into its own
cache, or decode one step for every row of the batch. Returns float32 logits on the CPU (the
last position's); the scheduler samples from them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from fmserve.errors import Overloaded
from services.inference.generation.batch import DecodeBatch
from services.inference.loading import Placement


@dataclass(frozen=True)
class Step:
    logits: torch.Tensor
    """[rows, vocab] float32 on the CPU."""
    seconds: float


class Engine:
    def __init__(self, module: Any, placement: Placement) -> None:
        self.module = module
        self.placement = placement
        self.config = module.config
        self.vocab_size = int(self.config.vocab_size)
        self.batch = DecodeBatch(placement.device)

    def prefill(self, prompt_ids: tuple[int, ...]) -> tuple[Step, DynamicCache]:
        """The prompt's forward pass alone (no padding: exactly what `generate` computes)."""
        started = time.perf_counter()
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.placement.device)
        cache = DynamicCache(config=self.config)
        with _translated(1), torch.inference_mode():
            out = self.module(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits[:, -1].float().cpu()
        return Step(logits, time.perf_counter() - started), cache

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
