"""A text-generation job's items in the inference stage: every item of a chunk is a sequence of
the model version's scheduler, all started at once so continuous batching steps them together,
their tokens collected until each finishes.

The scheduler has no priorities: it admits sequences first come, first served. So that streams
(Generate) never wait long behind a big job, this replica runs at most `max_sequences` job
sequences at once, over every model (FMSERVE_INFERENCE_JOB_MAX_SEQUENCES); the rest of the
scheduler's `max_sequences` stays free for streams. A chunk cancelled midway (its job was
cancelled or expired: the stage worker watches) closes its sequences' iterators, and each leaves
the batch at the scheduler's next step."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fmserve.errors import Unavailable
from services.inference.generation.instance import GenerationInstance
from services.inference.generation.params import GenerationRequest
from services.inference.generation.scheduler import Finished, Tokens
from services.inference.generation.stopping import CANCELLED
from services.inference.registry import ModelRegistry


@dataclass(frozen=True)
class Generated:
    token_ids: list[int]
    finished: Finished


class JobGenerations:
    """Owns the bound on this replica's job sequences."""

    def __init__(self, registry: ModelRegistry, max_sequences: int) -> None:
        self.registry = registry
        self._slots = asyncio.Semaphore(max_sequences)

    async def run(
        self, model: str, version: str, requests: list[GenerationRequest]
    ) -> list[Generated]:
        """Each request's generation, in order. The first error fails the chunk and cancels
        the other sequences (preprocess refuses, item by item, what the model would)."""
        instance = await self.registry.generator(model, version)
        tasks = [asyncio.ensure_future(self._one(instance, r)) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, instance: GenerationInstance, request: GenerationRequest) -> Generated:
        async with self._slots:
            token_ids: list[int] = []
            finished: Finished | None = None
            # Run to its end (it ends after Finished), so the generator is finalized now, not
            # when collected: its cleanup frees the sequence and counts the stream done. A
            # cancelled task raises inside it, which runs that cleanup too.
            async for event in instance.generate(request):
                if isinstance(event, Tokens):
                    token_ids.extend(event.ids)
                else:
                    finished = event
        if finished is None or finished.reason == CANCELLED:
            # A sequence the scheduler cut short (the model unloading, the service stopping)
            # gives a stream its text so far, but is no job item's answer: Unavailable is
            # transient, so the chunk is retried.
            raise Unavailable(f"model {instance.config.name!r} stopped before the sequence ended")
        return Generated(token_ids, finished)
