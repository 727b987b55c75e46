"""How full the job queue is, as the gateway sees it before taking a submission's items: the
messages waiting in the preprocess queues, read from RabbitMQ (a passive declare) at most once
per `job_queue_depth_cache_s` and shared by every submission.

Why a bound here and not the queues' own `x-max-length`: RabbitMQ refuses to redeclare an
existing queue with other arguments (PRECONDITION_FAILED), so adding it would stop every
deployment whose queues exist. An operator policy (`max-length`) can add a hard bound in the
broker as well; this one says "retry later" before any item of a submission is published.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fmserve.errors import Overloaded, Unavailable
from fmserve.queue.broker import Broker

log = logging.getLogger("fmserve.gateway.backlog")

STAGE = "preprocess"  # where submissions go: the first queue to fill


class Backlog:
    """The preprocess queues' depth against `max_messages` (0: no bound)."""

    def __init__(self, broker: Broker, max_messages: int, cache_s: float) -> None:
        self.broker = broker
        self.max_messages = max_messages
        self.cache_s = cache_s
        self._depth = 0
        self._read_at = -float("inf")
        self._lock = asyncio.Lock()

    async def check(self) -> None:
        """Raise Overloaded while more chunks than the bound wait to be preprocessed."""
        if self.max_messages > 0 and await self.depth() > self.max_messages:
            raise Overloaded(
                f"the job queue is full (more than {self.max_messages} chunks are waiting); "
                "retry the submission later"
            )

    async def depth(self) -> int:
        """The last reading, renewed when older than cache_s (one reading at a time)."""
        if self._stale():
            async with self._lock:
                if self._stale():  # another submission may have renewed it meanwhile
                    await self._read()
        return self._depth

    def _stale(self) -> bool:
        return time.monotonic() - self._read_at >= self.cache_s

    async def _read(self) -> None:
        try:
            self._depth = await self.broker.ready_messages(STAGE)
        except Unavailable as error:  # the publish that follows says so in its own words
            log.debug("could not read the job queue's depth: %s", error.message)
        self._read_at = time.monotonic()
