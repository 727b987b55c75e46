"""What the integration tests of the cache service and the job path share: their own Redis
database, a key prefix per test module, and a cache service settings factory."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from fmserve.queue.records import JobRecords
from services.cache.__main__ import build
from services.cache.settings import CacheSettings

DB = 14


def with_db(url: str, db: int) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


def settings_for(url: str, prefix: str, **overrides: Any) -> CacheSettings:
    return CacheSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        grace_period_s=1.0,
        redis_url=url,
        key_prefix=prefix,
        **overrides,
    )


@pytest.fixture(scope="module")
def prefix(request: pytest.FixtureRequest, redis_url: str) -> Iterator[str]:
    """The module's key prefix; every key under it is deleted after the module (job records
    written through a cache service, whose indexes never expire, included)."""
    module = request.module.__name__.rsplit(".", 1)[-1]
    prefix = f"fmserve-{module}-{uuid.uuid4().hex[:12]}:"
    yield prefix
    with SyncRedis.from_url(with_db(redis_url, DB)) as client:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)


@pytest.fixture(scope="module")
async def redis(redis_url: str, prefix: str) -> AsyncIterator[Redis]:
    """A client of the tests' database (the `prefix` fixture deletes the module's keys)."""
    client = Redis.from_url(with_db(redis_url, DB))
    yield client
    await client.aclose()


@asynccontextmanager
async def job_records(redis_url: str, prefix: str, **settings: Any) -> AsyncIterator[JobRecords]:
    """Job records in a real cache service (in-process, free port) under a test's key prefix,
    with `settings` (CacheSettings fields) over the tests' defaults."""
    service = build(settings_for(with_db(redis_url, DB), prefix, **settings))
    await service.start()
    records = JobRecords(f"127.0.0.1:{service.port}")
    await records.start()
    yield records
    await records.stop()
    await service.stop()
