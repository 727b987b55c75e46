"""The gateway's side of the result cache: batched lookups and stores through the cache
service, in front of them the results this gateway saw lately (the near cache). The cache is
optional: a slow or failing cache counts as a miss, never as an error."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from fmserve.core.batching import Batcher, BatchLimits
from fmserve.errors import FmserveError
from fmserve.v1 import common_pb2
from services.gateway.metrics import LOOKUPS, NEAR_HITS
from services.gateway.settings import GatewaySettings
from services.gateway.stages import StageClients

log = logging.getLogger("fmserve.gateway.cache")


class NearCache:
    """The results this gateway looked up or stored lately, each for `ttl_s`, the most
    recently used `entries` of them. A result never changes under its key (the key names the
    model version, the options and the input), so a copy here can only outlive the cache
    service's by up to `ttl_s`."""

    def __init__(self, entries: int, ttl_s: float) -> None:
        self.entries = entries
        self.ttl_s = ttl_s
        self._results: OrderedDict[str, tuple[float, common_pb2.Result]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._results)

    def get(self, key: str) -> common_pb2.Result | None:
        kept = self._results.get(key)
        if kept is None:
            return None
        expires, result = kept
        if expires <= time.monotonic():
            del self._results[key]
            return None
        self._results.move_to_end(key)
        return result

    def put(self, key: str, result: common_pb2.Result) -> None:
        """Keep `result`, as the cache service would answer it: marked cached. Kept results
        are shared by the answers that find them, which copy them into their replies."""
        if not self.entries:
            return
        if not result.cached:  # a result just computed: the caller's copy stays as it is
            kept = common_pb2.Result()
            kept.CopyFrom(result)
            kept.cached = True
            result = kept
        self._results[key] = (time.monotonic() + self.ttl_s, result)
        self._results.move_to_end(key)
        while len(self._results) > self.entries:
            self._results.popitem(last=False)


class ResultCache:
    """Looks results up and stores them, batching concurrent requests into one call each;
    a result seen lately is answered from the near cache, without a call."""

    def __init__(self, stages: StageClients, settings: GatewaySettings) -> None:
        self.stages = stages
        self.timeout_s = settings.cache_timeout_s
        self.near = NearCache(settings.near_cache_entries, settings.near_cache_ttl_s)
        limits = BatchLimits(max_batch_size=512, max_in_flight=4)
        self._lookups: Batcher[str, common_pb2.Result | None] = Batcher(self._lookup_batch, limits)
        self._stores: Batcher[tuple[str, common_pb2.Result], None] = Batcher(
            self._store_batch, limits
        )
        self._pending: set[asyncio.Future[None]] = set()

    async def lookup(self, model: str, keys: list[str]) -> list[common_pb2.Result | None]:
        """The cached result per key, or None; None for every key the near cache lacks when
        the cache service is down or slow."""
        found = [self.near.get(key) for key in keys]
        asked = [i for i, result in enumerate(found) if result is None]
        near = len(keys) - len(asked)
        if near:
            NEAR_HITS.labels(model).inc(near)
        if not asked:
            _count(model, hit=near)
            return found
        try:  # the keys are queued together, so that one request's keys share a call
            async with asyncio.timeout(self.timeout_s):  # not wait_for: see Pipeline.run
                fetched = await asyncio.gather(*self._lookups.enqueue([keys[i] for i in asked]))
        except (FmserveError, TimeoutError) as exc:
            _count(model, hit=near, error=len(asked))
            log.warning("cache lookup failed; answering from the model", extra={"error": str(exc)})
            return found
        for i, result in zip(asked, fetched, strict=True):
            if result is not None:
                found[i] = result
                self.near.put(keys[i], result)
        hits = sum(r is not None for r in found)
        _count(model, hit=hits, miss=len(keys) - hits)
        return found

    def store(self, items: list[tuple[str, common_pb2.Result]]) -> None:
        """Keep in the near cache, and store in the background: the reply never waits for the
        cache service."""
        for key, result in items:
            self.near.put(key, result)
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
