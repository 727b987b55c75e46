"""The gateway's reading of the job queue's depth: one reading serves every submission for
`cache_s`, and a RabbitMQ that cannot say refuses nothing (the publish reports it)."""

from __future__ import annotations

import asyncio

import pytest

from fmserve.errors import Overloaded, Unavailable
from services.gateway.backlog import Backlog

pytestmark = pytest.mark.timeout(10)


class FakeBroker:
    def __init__(self, depth: int | None) -> None:
        self.depth, self.reads = depth, 0

    async def ready_messages(self, stage: str) -> int:
        self.reads += 1
        await asyncio.sleep(0.01)
        if self.depth is None:
            raise Unavailable("the job queue is unavailable")
        return self.depth


async def test_concurrent_submissions_share_one_reading() -> None:
    broker = FakeBroker(3)
    backlog = Backlog(broker, max_messages=10, cache_s=60.0)  # type: ignore[arg-type]
    await asyncio.gather(*(backlog.check() for _ in range(50)))
    assert broker.reads == 1


async def test_over_the_bound_is_overloaded_and_at_it_is_not() -> None:
    broker = FakeBroker(10)
    backlog = Backlog(broker, max_messages=10, cache_s=0.0)  # type: ignore[arg-type]
    await backlog.check()
    broker.depth = 11
    with pytest.raises(Overloaded, match="the job queue is full"):
        await backlog.check()


async def test_an_unreadable_depth_refuses_nothing_and_no_bound_reads_nothing() -> None:
    broker = FakeBroker(None)
    await Backlog(broker, max_messages=1, cache_s=0.0).check()  # type: ignore[arg-type]
    broker.reads = 0
    await Backlog(broker, max_messages=0, cache_s=0.0).check()  # type: ignore[arg-type]
    assert broker.reads == 0
