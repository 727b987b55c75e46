"""The heap trimmer: the memory a burst freed goes back to the OS once forward passes pause,
never while one runs, and once per pause."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

import pytest

from services.inference.heap import HeapTrimmer

pytestmark = pytest.mark.timeout(10)

IDLE_S = 0.01


class Inline(Executor):
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def trimmer(idle_s: float = IDLE_S) -> tuple[HeapTrimmer, list[int]]:
    calls: list[int] = []
    return HeapTrimmer(idle_s, Inline(), trim=lambda: calls.append(1)), calls


async def pause() -> None:
    await asyncio.sleep(IDLE_S * 5)


async def test_trims_once_after_work_pauses() -> None:
    heap, calls = trimmer()
    for _ in range(3):  # a burst of batches
        with heap.working():
            pass
    await pause()
    assert calls == [1]
    await pause()
    assert calls == [1]  # no new work: nothing more to give back


async def test_never_trims_while_a_forward_pass_runs() -> None:
    heap, calls = trimmer()
    with heap.working():
        with heap.working():  # two instances' batches overlap
            pass
        await pause()
        assert calls == []
    await pause()
    assert calls == [1]


async def test_each_pause_after_work_trims_again() -> None:
    heap, calls = trimmer()
    for _ in range(2):
        with heap.working():
            pass
        await pause()
    assert calls == [1, 1]


async def test_off_when_idle_is_zero_and_after_stop() -> None:
    off, off_calls = trimmer(idle_s=0)
    stopped, stopped_calls = trimmer()
    with off.working(), stopped.working():
        pass
    stopped.stop()
    await pause()
    assert off_calls == stopped_calls == []


async def test_a_batch_ending_after_stop_arms_no_trim() -> None:
    """The registry stops the trimmer, then closes its instances: a batch still running then
    ends after stop() and must not schedule a trim on the executor being shut down."""
    heap, calls = trimmer()
    with heap.working():
        heap.stop()
    await pause()
    assert calls == []
