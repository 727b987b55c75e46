"""The result cache's rules: which keys and times to live are accepted, what a hit is, and what
is counted. Values are opaque bytes here (serialized results; the servicer converts them)."""

from __future__ import annotations

from collections.abc import Sequence

from fmserve.errors import InvalidInput
from services.cache.metrics import HITS, MISSES, STORES
from services.cache.store import RedisStore

# Gateway keys are about 100 bytes; a longer key means raw input went into it instead of a digest.
MAX_KEY_BYTES = 512


class ResultCache:
    """Looks up and stores results by key, validating requests before Redis sees them."""

    def __init__(self, redis: RedisStore, default_ttl_s: int) -> None:
        self.redis = redis
        self.default_ttl_s = default_ttl_s

    async def lookup(self, keys: Sequence[str]) -> list[bytes | None]:
        """The value under each key, in order, None for a miss. No keys: no Redis call."""
        if not keys:
            return []
        check_keys(keys)
        values = await self.redis.get_many(keys)
        hits = sum(value is not None for value in values)
        HITS.inc(hits)
        MISSES.inc(len(values) - hits)
        return values

    async def store(self, items: Sequence[tuple[str, bytes]], ttl_s: int) -> int:
        """Writes every item for `ttl_s` seconds (0: the default); returns how many it wrote."""
        check_ttl(ttl_s)
        if not items:
            return 0
        check_keys([key for key, _ in items])
        check_values(items)
        await self.redis.set_many(items, ttl_s or self.default_ttl_s)
        STORES.inc(len(items))
        return len(items)


def check_keys(keys: Sequence[str]) -> None:
    for index, key in enumerate(keys):
        size = len(key.encode())
        if size == 0:
            raise InvalidInput(f"cache key {index} is empty")
        if size > MAX_KEY_BYTES:
            raise InvalidInput(
                f"cache key {index} is {size} bytes; the limit is {MAX_KEY_BYTES} "
                "(put a digest of long inputs in the key, not the input)"
            )


def check_ttl(ttl_s: int) -> None:
    if ttl_s < 0:
        raise InvalidInput(
            f"ttl_s is {ttl_s}; give 0 for the default time to live or a positive number of seconds"
        )


def check_values(items: Sequence[tuple[str, bytes]]) -> None:
    for index, (_, value) in enumerate(items):
        if not value:
            raise InvalidInput(f"item {index} has no result to store")
