"""Who watches which job: one poller per watched job, shared by every watcher of that job, and
the bounds on how many watch at once (in all, and per client connection).

A watch costs one small read of the cache service per job per `job_watch_interval_s`, however
many clients watch it, and nothing more while nothing changes: the poller wakes its watchers
only on a change of state or progress. A watcher that leaves frees its slot; the last one to
leave a job stops its poller. (A notification channel through Redis would save the reads too,
but needs a subscription per gateway replica and a replay of what was missed; the shared poll
is bounded and simple.)
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator

from fmserve.core.jobs import TERMINAL, state_from_wire
from fmserve.errors import Overloaded
from fmserve.queue.records import JobRecords
from fmserve.v1 import jobs_pb2


class _Feed:
    """One job's poller and the latest record it read, handed to every watcher of the job."""

    def __init__(self, job_id: str, records: JobRecords, interval_s: float) -> None:
        self.job_id = job_id
        self.records = records
        self.interval_s = interval_s
        self.watchers = 0
        self.version = 0  # how many changes were published
        self.job: jobs_pb2.Job | None = None
        self.error: Exception | None = None
        self.ended = False
        self._changed = asyncio.Condition()
        # A context of its own: the poller outlives the call that started it, so it must not
        # inherit that call's deadline or request id.
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._poll(), context=contextvars.Context())

    async def updates(self) -> AsyncIterator[jobs_pb2.Job]:
        """The latest record, then each change, until the job is terminal (or reading fails)."""
        seen = 0
        while True:
            async with self._changed:
                while self.version == seen:
                    await self._changed.wait()
                job, error, ended, seen = self.job, self.error, self.ended, self.version
            if error is not None:
                raise error.with_traceback(None)  # one error, raised in every watcher
            assert job is not None
            yield job
            if ended:
                return

    def stop(self) -> None:
        self._task.cancel()

    async def _poll(self) -> None:
        last = None
        try:
            while True:
                job = await self.records.get(self.job_id)
                terminal = state_from_wire(job.state) in TERMINAL
                seen = (job.state, job.done, job.failed, job.sealed)
                if seen != last or terminal:
                    last = seen
                    await self._publish(job, None, terminal)
                if terminal:
                    return
                await asyncio.sleep(self.interval_s)
        except Exception as error:  # the job is unknown, the cache is down...: every watcher hears
            await self._publish(None, error, True)

    async def _publish(
        self, job: jobs_pb2.Job | None, error: Exception | None, ended: bool
    ) -> None:
        async with self._changed:
            self.job, self.error, self.ended = job, error, ended
            self.version += 1
            self._changed.notify_all()


class Watchers:
    """The gateway's watch streams: at most `max_total` at once, `max_per_peer` per client
    connection (0: no bound), and one shared poller per watched job."""

    def __init__(
        self, records: JobRecords, interval_s: float, max_total: int, max_per_peer: int
    ) -> None:
        self.records = records
        self.interval_s = interval_s
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self.total = 0
        self._per_peer: Counter[str] = Counter()
        self._feeds: dict[str, _Feed] = {}

    @property
    def polled(self) -> int:
        """How many jobs are being polled now."""
        return len(self._feeds)

    async def watch(self, job_id: str, peer: str) -> AsyncGenerator[jobs_pb2.Job, None]:
        """The job's record now, then on every change of state or progress, until terminal."""
        self._admit(peer)
        feed = self._join(job_id, peer)
        try:
            async for job in feed.updates():
                yield job
        finally:
            self._leave(feed, peer)

    def _admit(self, peer: str) -> None:
        if self.max_total and self.total >= self.max_total:
            raise Overloaded(
                f"too many jobs are watched at once (at most {self.max_total}); retry later, "
                "or ask for the job with GetJob now and then"
            )
        if self.max_per_peer and self._per_peer[peer] >= self.max_per_peer:
            raise Overloaded(
                f"this connection watches too many jobs at once (at most {self.max_per_peer}); "
                "end a watch first, or ask for the job with GetJob now and then"
            )

    def _join(self, job_id: str, peer: str) -> _Feed:
        feed = self._feeds.get(job_id)
        if feed is None or feed.error is not None:  # a failed poll is not handed to newcomers
            feed = self._feeds[job_id] = _Feed(job_id, self.records, self.interval_s)
        feed.watchers += 1
        self.total += 1
        self._per_peer[peer] += 1
        return feed

    def _leave(self, feed: _Feed, peer: str) -> None:
        self.total -= 1
        self._per_peer[peer] -= 1
        if self._per_peer[peer] <= 0:
            del self._per_peer[peer]
        feed.watchers -= 1
        if feed.watchers == 0:
            feed.stop()
            if self._feeds.get(feed.job_id) is feed:
                del self._feeds[feed.job_id]
