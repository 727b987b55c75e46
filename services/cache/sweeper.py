"""The job sweeper: a background task that ends jobs on time (job_store.py says which and why),
so a lapsed submission or a passed deadline shows in every read and list within a fraction of
a second, even if nothing reads the job. Every replica sweeps; the sweep is atomic."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fmserve.errors import FmserveError
from services.cache.jobs import JobBook

log = logging.getLogger("fmserve.cache.sweeper")


class JobSweeper:
    """`start()` begins sweeping every `interval_s`, `stop()` ends it (safe before start)."""

    def __init__(self, book: JobBook, interval_s: float) -> None:
        self.book = book
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="job-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                failed, expired = await self.book.sweep()
            except FmserveError as error:  # Redis down: store.py logs it; sweep again later
                log.debug("job sweep failed: %s", error.message)
            else:
                if failed or expired:
                    log.info("jobs ended on time", extra={"failed": failed, "expired": expired})
            await asyncio.sleep(self.interval_s)
