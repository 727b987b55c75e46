"""The cache service in-process (a real grpc.aio server on port 0) against the real Redis, called
through the generated stub. Isolated by database 14 and a key prefix unique to the run; every
key written under that prefix is deleted afterwards."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from fmserve.v1 import cache_pb2, cache_pb2_grpc, common_pb2
from services.cache.__main__ import build
from services.cache.settings import CacheSettings
from tests.integration.conftest import DB, settings_for, with_db

EMBEDDING = common_pb2.Result(embedding=common_pb2.Embedding(values=[0.25, -0.5, 0.125]))
CLASSIFICATION = common_pb2.Result(
    classification=common_pb2.Classification(
        labels=[common_pb2.LabelScore(label="positive", score=0.75)]
    )
)
ENTITIES = common_pb2.Result(
    entities=common_pb2.Entities(
        entities=[common_pb2.Entity(label="PER", score=0.5, start=0, end=3, text="Ada")]
    )
)


@asynccontextmanager
async def running(settings: CacheSettings) -> AsyncIterator[grpc.aio.Channel]:
    service = build(settings)
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            yield channel
    finally:
        await service.stop()


@pytest.fixture(scope="module")
async def stub(
    redis_url: str, prefix: str, redis: Redis
) -> AsyncIterator[cache_pb2_grpc.CacheStub]:
    async with running(settings_for(with_db(redis_url, DB), prefix)) as channel:
        yield cache_pb2_grpc.CacheStub(channel)


def unique(name: str) -> str:
    return f"result:test:{name}:{uuid.uuid4().hex}"


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def store(
    stub: cache_pb2_grpc.CacheStub, pairs: dict[str, common_pb2.Result], ttl_s: int = 0
):
    items = [cache_pb2.StoreItem(key=k, result=r) for k, r in pairs.items()]
    return await stub.Store(cache_pb2.StoreRequest(items=items, ttl_s=ttl_s), timeout=5)


async def lookup(stub: cache_pb2_grpc.CacheStub, keys: list[str]) -> list[cache_pb2.CacheEntry]:
    reply = await stub.Lookup(cache_pb2.LookupRequest(keys=keys), timeout=5)
    return list(reply.entries)


def marked(result: common_pb2.Result) -> common_pb2.Result:
    copy = common_pb2.Result()
    copy.CopyFrom(result)
    copy.cached = True
    return copy


async def test_store_then_lookup_returns_equal_results_marked_cached(stub, redis, prefix):
    pairs = {unique("e"): EMBEDDING, unique("c"): CLASSIFICATION, unique("n"): ENTITIES}
    assert (await store(stub, pairs)).stored == 3
    entries = await lookup(stub, list(pairs))
    assert [e.found for e in entries] == [True, True, True]
    assert [e.result for e in entries] == [marked(r) for r in pairs.values()]
    # Stored unmarked: the mark says where this reply came from, not what the value is.
    raw = await redis.get(f"{prefix}cache:{next(iter(pairs))}")
    assert common_pb2.Result.FromString(raw) == EMBEDDING


async def test_a_result_stored_marked_is_kept_unmarked(stub, redis, prefix):
    key = unique("marked")
    await store(stub, {key: marked(EMBEDDING)})
    raw = await redis.get(f"{prefix}cache:{key}")
    assert common_pb2.Result.FromString(raw).cached is False


async def test_missing_key_is_not_found(stub):
    [entry] = await lookup(stub, [unique("absent")])
    assert entry.found is False
    assert not entry.HasField("result")


async def test_order_is_kept_for_mixed_hits_and_misses_and_counted(stub):
    a, b = unique("a"), unique("b")
    await store(stub, {a: EMBEDDING, b: CLASSIFICATION})
    hits, misses = counter("fmserve_cache_hits_total"), counter("fmserve_cache_misses_total")
    keys = [unique("miss1"), a, unique("miss2"), b, a]
    entries = await lookup(stub, keys)
    assert [e.found for e in entries] == [False, True, False, True, True]
    assert [entries[i].result for i in (1, 3, 4)] == [
        marked(EMBEDDING),
        marked(CLASSIFICATION),
        marked(EMBEDDING),
    ]
    assert counter("fmserve_cache_hits_total") - hits == 3
    assert counter("fmserve_cache_misses_total") - misses == 2


async def test_ttl_is_applied_and_zero_means_the_default(stub, redis, prefix):
    short, default = unique("short"), unique("default")
    await store(stub, {short: EMBEDDING}, ttl_s=120)
    await store(stub, {default: EMBEDDING}, ttl_s=0)
    assert 100 < await redis.ttl(f"{prefix}cache:{short}") <= 120
    assert 3500 < await redis.ttl(f"{prefix}cache:{default}") <= 3600


async def test_empty_requests_get_empty_replies(stub):
    assert await lookup(stub, []) == []
    assert (await store(stub, {})).stored == 0


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (cache_pb2.LookupRequest(keys=["k" * 513]), "513 bytes"),
        (cache_pb2.LookupRequest(keys=["é" * 257]), "514 bytes"),  # bytes, not characters
        (cache_pb2.LookupRequest(keys=["ok", ""]), "cache key 1 is empty"),
        (
            cache_pb2.StoreRequest(
                items=[cache_pb2.StoreItem(key="k", result=EMBEDDING)], ttl_s=-1
            ),
            "ttl_s is -1",
        ),
        (cache_pb2.StoreRequest(items=[cache_pb2.StoreItem(key="k")]), "item 0 has no result"),
    ],
)
async def test_bad_inputs_are_invalid_argument(stub, request_, needle):
    call = stub.Lookup if isinstance(request_, cache_pb2.LookupRequest) else stub.Store
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(request_, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in caught.value.details()


async def test_a_refused_store_writes_nothing(stub):
    good = unique("good")
    with pytest.raises(grpc.aio.AioRpcError):
        await store(stub, {good: EMBEDDING, "k" * 600: EMBEDDING})
    [entry] = await lookup(stub, [good])
    assert entry.found is False


async def test_unreachable_redis_gives_unavailable_quickly_and_the_service_keeps_serving(prefix):
    errors = counter("fmserve_cache_redis_errors_total", operation="lookup", reason="unreachable")
    # Port 1 is closed; the password must never reach a message.
    async with running(settings_for("redis://user:s3cret@127.0.0.1:1/14", prefix)) as channel:
        stub = cache_pb2_grpc.CacheStub(channel)
        for _ in range(2):  # still serving after the first failure
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await lookup(stub, [unique("down")])
            assert time.monotonic() - started < 1.0
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Redis is unreachable at 127.0.0.1:1" in caught.value.details()
            assert "s3cret" not in caught.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await store(stub, {unique("down"): EMBEDDING})
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await lookup(stub, []) == []
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="fmserve.v1.Cache"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    after = counter("fmserve_cache_redis_errors_total", operation="lookup", reason="unreachable")
    assert after - errors == 2
