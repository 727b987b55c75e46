"""The adapter around redis.asyncio: the one module that sees Redis, its client and its
exceptions. Values are opaque bytes here; every Redis failure leaves as fmserve.errors.Unavailable
with a message that names the host and port (never the URL's password).

Redis layout, every key under `key_prefix` (default "fmserve:"):

    {prefix}cache:{key}   string   a serialized fmserve.v1.Result, written with SET ... EX ttl
    {prefix}job:...       job records and their results (see job_store.py)

`key` is the caller's cache key as sent, e.g. "result:minilm-embed:1:<digest>".

Eviction: every cache key carries a TTL (SET with EX, never a bare SET), rather than one database
per concern. Redis applies `maxmemory` and its eviction policy to the whole instance, not per
database, so a separate database would separate names only: under `allkeys-lru`, job records in
db 1 are evicted as readily as cache entries in db 0. Job records carry a TTL too (their deadline
plus retention, see job_store.py: nothing is kept forever), so the instance runs `volatile-ttl`,
which evicts the keys nearest their expiry first: cache entries (hours) long before job records
(days). A deployment that must never evict a job record gives them their own instance with
`noeviction`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import cast
from urllib.parse import urlsplit

from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from fmserve.errors import Unavailable
from services.cache.metrics import REDIS_ERRORS
from services.cache.settings import CacheSettings

log = logging.getLogger("fmserve.cache.store")

# While Redis is down every call fails; one log line per interval says so, the metric counts all.
_WARN_EVERY_S = 10.0


class RedisStore:
    """Bytes by key in Redis, each with a time to live. `start()` connects, `stop()` closes."""

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        self.address = redis_address(settings.redis_url.get_secret_value())
        self._prefix = f"{settings.key_prefix}cache:"
        self._client: Redis | None = None
        self._last_warning = -math.inf

    async def start(self) -> None:
        self._client = self._connect()
        try:
            with self._translated("ping"):
                await self._client.ping()
        except Unavailable:
            # The cache is optional on the sync path (the gateway reads its errors as misses),
            # so a Redis that is down must not keep the service from starting.
            log.warning("serving without Redis until it is reachable", extra=self._where())
            return
        log.info("connected to Redis", extra=self._where())

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The value under each key, in order, None where absent: one MGET."""
        with self._translated("lookup"):
            values = await self._redis.mget([self._prefix + key for key in keys])
        # The client is built without decode_responses, so values are bytes, never str.
        return cast(list[bytes | None], values)

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl_s: int) -> None:
        """Writes every item with the same time to live, in one round trip. No MULTI/EXEC:
        entries are independent, and a partly written batch is only a few more misses."""
        with self._translated("store"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, value in items:
                    pipe.set(self._prefix + key, value, ex=ttl_s)
                await pipe.execute()

    @property
    def client(self) -> Redis:
        """The connected client, for the job store's scripts (same package, same boundary)."""
        return self._redis

    def translated(self, operation: str) -> contextlib.AbstractContextManager[None]:
        """Redis failures inside the block leave as Unavailable, counted and logged."""
        return self._translated(operation)

    @property
    def _redis(self) -> Redis:
        if self._client is None:
            raise Unavailable("the cache service is not connected to Redis (not started)")
        return self._client

    def _connect(self) -> Redis:
        s = self.settings
        pool = BlockingConnectionPool.from_url(
            s.redis_url.get_secret_value(),
            max_connections=s.max_connections,
            timeout=s.socket_timeout_s,  # wait for a free pooled connection
            socket_timeout=s.socket_timeout_s,
            socket_connect_timeout=s.socket_timeout_s,
            # redis-py's default (10 retries, up to 1 s apart) would hold a lookup for seconds.
            retry=Retry(ExponentialWithJitterBackoff(cap=0.1, base=0.01), s.retries),
        )
        return Redis.from_pool(pool)

    @contextmanager
    def _translated(self, operation: str) -> Iterator[None]:
        try:
            yield
        except (rx.RedisError, OSError) as exc:
            reason, message = describe(exc, self.address, self.settings)
            REDIS_ERRORS.labels(operation, reason).inc()
            self._warn(operation, reason, exc)
            raise Unavailable(message) from exc

    def _warn(self, operation: str, reason: str, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_warning < _WARN_EVERY_S:
            return
        self._last_warning = now
        log.warning("redis %s failed (%s): %s", operation, reason, exc, extra=self._where())

    def _where(self) -> dict[str, str]:
        return {"redis": self.address}


def redis_address(url: str) -> str:
    """Where a Redis URL points, without user or password: `host:port`, or a socket path."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{parts.port or 6379}"


def describe(exc: Exception, address: str, settings: CacheSettings) -> tuple[str, str]:
    """A bounded reason (a metric label) and a message a person can act on for a Redis failure."""
    if isinstance(exc, rx.TimeoutError | TimeoutError):
        timeout_s = settings.socket_timeout_s
        return "timeout", f"Redis at {address} did not answer within {timeout_s:g} s"
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError):
        return "refused", f"Redis at {address} refused the credentials given in FMSERVE_REDIS_URL"
    if isinstance(exc, rx.ConnectionError) and isinstance(exc.__cause__, TimeoutError):
        return "busy", (
            f"all {settings.max_connections} connections to Redis at {address} are busy; "
            "raise FMSERVE_CACHE_MAX_CONNECTIONS or run more cache replicas"
        )
    if isinstance(exc, rx.ConnectionError | OSError):
        return "unreachable", (
            f"Redis is unreachable at {address}; check that it is running and that "
            "FMSERVE_REDIS_URL points to it"
        )
    if isinstance(exc, rx.OutOfMemoryError):
        return "refused", (
            f"Redis at {address} is out of memory; raise its maxmemory or set an eviction "
            "policy such as volatile-ttl"
        )
    return "refused", f"Redis at {address} refused the command ({type(exc).__name__})"
