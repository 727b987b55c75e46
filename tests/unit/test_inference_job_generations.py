"""A generation job's chunk in the inference stage (services/inference/job_generations.py), over
an in-memory model instance: every item's tokens collected in order, at most `max_sequences`
sequences at once, a sequence the scheduler cut short is no answer (retryable), and a failure
or a cancelled chunk ends every sibling sequence."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fmserve.errors import InvalidInput, Unavailable
from services.inference.generation.params import GenerationRequest
from services.inference.generation.scheduler import Event, Finished, Tokens
from services.inference.job_generations import Generated, JobGenerations

pytestmark = pytest.mark.timeout(10)


class FakeInstance:
    """Generates each prompt's ids back, one token a step; counts the sequences it runs."""

    def __init__(self, reason: str = "length", fail_on: int | None = None) -> None:
        self.reason = reason
        self.fail_on = fail_on
        self.running = 0
        self.most = 0
        self.closed = 0
        self.config: Any = type("Config", (), {"name": "m"})

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            for token in request.prompt_ids:
                await asyncio.sleep(0.01)
                if token == self.fail_on:
                    raise InvalidInput("a bad token")
                yield Tokens((token,))
            n = len(request.prompt_ids)
            yield Finished(self.reason, prompt_tokens=n, completion_tokens=n)
        finally:
            self.running -= 1
            self.closed += 1


class FakeRegistry:
    def __init__(self, instance: FakeInstance) -> None:
        self.instance = instance

    async def generator(self, name: str, version: str = "") -> FakeInstance:
        return self.instance


def generations(instance: FakeInstance, max_sequences: int = 8) -> JobGenerations:
    return JobGenerations(FakeRegistry(instance), max_sequences)  # type: ignore[arg-type]


def requests(*prompts: tuple[int, ...]) -> list[GenerationRequest]:
    return [GenerationRequest(p) for p in prompts]


async def test_every_item_gets_its_tokens_in_order() -> None:
    done = await generations(FakeInstance()).run("m", "", requests((1, 2, 3), (4,), (5, 6)))

    assert done == [
        Generated([1, 2, 3], Finished("length", 3, 3)),
        Generated([4], Finished("length", 1, 1)),
        Generated([5, 6], Finished("length", 2, 2)),
    ]


async def test_at_most_max_sequences_run_at_once() -> None:
    instance = FakeInstance()

    await generations(instance, max_sequences=3).run("m", "", requests(*[(1, 2)] * 10))

    assert instance.most == 3


async def test_a_sequence_cut_short_is_retryable_not_an_answer() -> None:
    with pytest.raises(Unavailable, match="stopped before the sequence ended"):
        await generations(FakeInstance(reason="cancelled")).run("m", "", requests((1, 2)))


async def test_a_failing_item_ends_its_siblings() -> None:
    instance = FakeInstance(fail_on=9)

    with pytest.raises(InvalidInput, match="a bad token"):
        await generations(instance).run("m", "", requests((1, 9), (1, 2, 3, 4, 5, 6, 7, 8)))

    assert instance.running == 0 and instance.closed == 2


async def test_a_cancelled_chunk_closes_every_sequence() -> None:
    instance = FakeInstance()
    run = asyncio.ensure_future(generations(instance).run("m", "", requests(*[(1,) * 50] * 4)))
    await asyncio.sleep(0.05)

    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run

    assert instance.running == 0 and instance.closed == 4
