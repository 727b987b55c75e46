"""The gateway's side of the result cache: batched lookups and stores through the cache
service. The cache is optional: a slow or failing cache counts as a miss, never as an error."""

from __future__ import annotations

import asyncio
import logging

from fmserve.core.batching import Batcher, BatchLimits
from fmserve.errors import FmserveError
from fmserve.v1 import common_pb2
from services.gateway.metrics import LOOKUPS
from services.gateway.settings import GatewaySettings
from services.gateway.stages import StageClients

log = logging.getLogger("fmserve.gateway.cache")


class ResultCache:
    """Looks results up and stores them, batching concurrent requests into one call each."""

    def __init__(self, stages: StageClients, settings: GatewaySettings) -> None:
        self.stages = stages
        self.timeout_s = settings.cache_timeout_s
        limits = BatchLimits(max_batch_size=512, max_in_flight=4)
        self._lookups: Batcher[str, common_pb2.Result | None] = Batcher(self._lookup_batch, limits)
        self._stores: Batcher[tuple[str, common_pb2.Result], None] = Batcher(
            self._store_batch, limits
        )
        self._pending: set[asyncio.Future[None]] = set()

    async def lookup(self, model: str, keys: list[str]) -> list[common_pb2.Result | None]:
        """The cached result per key, or None; all None when the cache is down or slow."""
        try:  # the keys are queued together, so that one request's keys share a call
            async with asyncio.timeout(self.timeout_s):  # not wait_for: see Pipeline.run
                found = await asyncio.gather(*self._lookups.enqueue(keys))
        except (FmserveError, TimeoutError) as exc:
            _count(model, error=len(keys))
            log.warning("cache lookup failed; answering from the model", extra={"error": str(exc)})
            return [None] * len(keys)
        hits = sum(r is not None for r in found)
        _count(model, hit=hits, miss=len(keys) - hits)
        return list(found)

    def store(self, items: list[tuple[str, common_pb2.Result]]) -> None:
        """Store in the background: the reply never waits for the cache."""
        try:
            stores = self._stores.enqueue(items)
        except FmserveError as exc:  # too many stores queued, or stopping
            log.warning("cache store skipped", extra={"error": str(exc)})
            return
        for pending in stores:
            self._pending.add(pending)
            pending.add_done_callback(self._stored)

    def _stored(self, pending: asyncio.Future[None]) -> None:
        self._pending.discard(pending)
        if not pending.cancelled() and pending.exception():
            log.warning("cache store failed", extra={"error": str(pending.exception())})

    async def _lookup_batch(self, keys: list[str]) -> list[common_pb2.Result | None]:
        return await self.stages.lookup(keys, self.timeout_s)

    async def _store_batch(self, items: list[tuple[str, common_pb2.Result]]) -> list[None]:
        await self.stages.store(items, timeout=2.0)
        return [None] * len(items)

    async def start(self) -> None:
        """Nothing to start: its two batchers need no task until the first call."""

    async def stop(self) -> None:
        await self._lookups.stop()
        await self._stores.stop()


def _count(model: str, hit: int = 0, miss: int = 0, error: int = 0) -> None:
    """Every outcome, zeros too: a model's three series exist from its first lookup, so the
    first failure is a rise that rate() sees (not a new series) and "lookups failed" reads 0."""
    for outcome, count in (("hit", hit), ("miss", miss), ("error", error)):
        LOOKUPS.labels(model, outcome).inc(count)
