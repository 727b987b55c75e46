"""The cache service's job sweeper without Redis: it sweeps on its interval, outlives a failed
sweep (Redis down), and stops cleanly, even before it started."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from fmserve.errors import Unavailable
from services.cache.jobs import JobBook
from services.cache.sweeper import JobSweeper

pytestmark = pytest.mark.timeout(10)


class Book:
    """A job book whose first sweep fails as a Redis outage does."""

    def __init__(self) -> None:
        self.sweeps = 0

    async def sweep(self) -> tuple[int, int]:
        self.sweeps += 1
        if self.sweeps == 1:
            raise Unavailable("Redis is unreachable")
        return 1, 1


async def test_the_sweeper_sweeps_on_its_interval_past_a_failed_sweep() -> None:
    book = Book()
    sweeper = JobSweeper(cast(JobBook, book), interval_s=0.01)
    await sweeper.start()
    await asyncio.sleep(0.2)
    await sweeper.stop()
    swept = book.sweeps
    assert swept >= 3
    await asyncio.sleep(0.05)
    assert book.sweeps == swept  # stopped means stopped


async def test_stop_before_start_is_safe() -> None:
    await JobSweeper(cast(JobBook, Book()), interval_s=0.01).stop()
