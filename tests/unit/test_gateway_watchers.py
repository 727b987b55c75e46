"""WatchJob's cost and bounds, with job records in memory that count their reads: many watchers
of one job share one poll per interval and all see the same changes and the end; streams over
the bounds are refused; a watcher that leaves frees its slot, and the last one stops the poll."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from fmserve.errors import JobNotFound, Overloaded
from fmserve.v1 import jobs_pb2
from services.gateway.watchers import Watchers

pytestmark = pytest.mark.timeout(30)
INTERVAL_S = 0.05


class CountingRecords:
    """One job whose record a test moves on; counts every read."""

    def __init__(self) -> None:
        self.job = jobs_pb2.Job(id="j", state=jobs_pb2.JOB_STATE_QUEUED, total=3, sealed=True)
        self.reads = 0

    async def get(self, job_id: str) -> jobs_pb2.Job:
        self.reads += 1
        if job_id != self.job.id:
            raise JobNotFound(f"no job {job_id}")
        return jobs_pb2.Job().FromString(self.job.SerializeToString())


def new_watchers(
    records: CountingRecords, max_total: int = 1000, max_per_peer: int = 0
) -> Watchers:
    return Watchers(records, INTERVAL_S, max_total, max_per_peer)  # type: ignore[arg-type]


async def eventually(predicate: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


async def collect(watchers: Watchers, into: list[tuple[int, int]], peer: str = "p") -> None:
    async for job in watchers.watch("j", peer):
        into.append((job.state, job.done))


async def test_200_watchers_share_one_read_per_interval_and_see_the_same_changes() -> None:
    records = CountingRecords()
    watchers = new_watchers(records)
    seen: list[list[tuple[int, int]]] = [[] for _ in range(200)]
    tasks = [asyncio.create_task(collect(watchers, s, f"peer-{i % 7}")) for i, s in enumerate(seen)]
    await eventually(lambda: all(len(s) == 1 for s in seen))

    before, started = records.reads, time.monotonic()
    await asyncio.sleep(20 * INTERVAL_S)  # nothing changes: no update, one read per interval
    reads = records.reads - before
    assert reads <= (time.monotonic() - started) / INTERVAL_S + 2, reads
    assert all(len(s) == 1 for s in seen)

    records.job.state, records.job.done = jobs_pb2.JOB_STATE_RUNNING, 1
    await eventually(lambda: all(len(s) == 2 for s in seen))
    records.job.state, records.job.done = jobs_pb2.JOB_STATE_SUCCEEDED, 3
    await asyncio.wait_for(asyncio.gather(*tasks), 10)

    expected = [
        (jobs_pb2.JOB_STATE_QUEUED, 0),
        (jobs_pb2.JOB_STATE_RUNNING, 1),
        (jobs_pb2.JOB_STATE_SUCCEEDED, 3),
    ]
    assert all(s == expected for s in seen)
    assert (watchers.total, watchers.polled) == (0, 0)


async def test_watchers_over_the_bound_are_refused_and_leaving_frees_a_slot() -> None:
    records = CountingRecords()
    watchers = new_watchers(records, max_total=5)
    tasks = [asyncio.create_task(collect(watchers, [])) for _ in range(5)]
    await eventually(lambda: watchers.total == 5)
    with pytest.raises(Overloaded, match="at most 5"):
        await collect(watchers, [])
    tasks.pop().cancel()
    await eventually(lambda: watchers.total == 4)
    tasks.append(asyncio.create_task(collect(watchers, [])))
    await eventually(lambda: watchers.total == 5)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_one_connection_may_hold_only_its_share() -> None:
    watchers = new_watchers(CountingRecords(), max_per_peer=2)
    tasks = [asyncio.create_task(collect(watchers, [], "a")) for _ in range(2)]
    await eventually(lambda: watchers.total == 2)
    with pytest.raises(Overloaded, match="this connection"):
        await collect(watchers, [], "a")
    tasks.append(asyncio.create_task(collect(watchers, [], "b")))  # another connection may
    await eventually(lambda: watchers.total == 3)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_the_last_watcher_to_leave_stops_the_poll() -> None:
    records = CountingRecords()
    watchers = new_watchers(records)
    tasks = [asyncio.create_task(collect(watchers, [])) for _ in range(3)]
    await eventually(lambda: watchers.total == 3 and records.reads > 0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert (watchers.total, watchers.polled) == (0, 0)
    await asyncio.sleep(INTERVAL_S)  # a cancelled poller finishes its read, if one was running
    reads = records.reads
    await asyncio.sleep(5 * INTERVAL_S)
    assert records.reads == reads


async def test_a_closed_stream_frees_its_slot_at_once() -> None:
    watchers = new_watchers(CountingRecords())
    stream = watchers.watch("j", "p")
    await anext(stream)
    assert watchers.total == 1
    await stream.aclose()
    assert (watchers.total, watchers.polled) == (0, 0)


async def test_every_watcher_of_an_unknown_job_hears_not_found() -> None:
    watchers = new_watchers(CountingRecords())

    async def watch_missing() -> None:
        async for _ in watchers.watch("missing", "p"):
            pass

    results = await asyncio.gather(*(watch_missing() for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, JobNotFound) for r in results)
    assert (watchers.total, watchers.polled) == (0, 0)
