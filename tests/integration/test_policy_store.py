"""Traffic policies below the gateway: the cache service in-process (a real grpc.aio server on
port 0) against the real Redis, through the gateway's PolicyStore client and PolicyBook.
Compare-and-set lets one writer win; a change reaches another gateway's book within a poll;
policies outlive the cache service (they are in Redis)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from fmserve.errors import Conflict, InvalidInput
from fmserve.v1 import policy_pb2
from services.cache.__main__ import build
from services.gateway.policies import PolicyBook
from services.gateway.policy_store import PolicyStore
from tests.integration.conftest import DB, settings_for, with_db

pytestmark = pytest.mark.timeout(60)

POLL_S = 0.25


@pytest.fixture
async def address(redis_url: str, prefix: str, redis: Redis) -> AsyncIterator[str]:
    service = build(settings_for(with_db(redis_url, DB), prefix))
    await service.start()
    yield f"127.0.0.1:{service.port}"
    await service.stop()


@pytest.fixture
async def store(address: str) -> AsyncIterator[PolicyStore]:
    store = PolicyStore(address)
    await store.start()
    yield store
    await store.stop()


def canary(percent: int, model: str = "tiny") -> policy_pb2.TrafficPolicy:
    """The module's tests share a key prefix: each uses a model of its own."""
    return policy_pb2.TrafficPolicy(
        model=model, stable_version="1", canary_version="2", canary_percent=percent
    )


async def test_compare_and_set_lets_one_writer_win(store: PolicyStore) -> None:
    first = await store.put(canary(10), expected_revision=0)
    assert first.revision > 0
    with pytest.raises(Conflict, match="changed meanwhile"):
        await store.put(canary(20), expected_revision=0)
    writes = [store.put(canary(30 + i), expected_revision=first.revision) for i in range(5)]
    results = await asyncio.gather(*writes, return_exceptions=True)
    assert sum(isinstance(r, policy_pb2.TrafficPolicy) for r in results) == 1
    assert sum(isinstance(r, Conflict) for r in results) == 4
    [winner] = [r for r in results if isinstance(r, policy_pb2.TrafficPolicy)]
    listing = await store.all()
    [stored] = [p for p in listing.policies if p.model == "tiny"]
    assert (stored.canary_percent, stored.revision) == (winner.canary_percent, winner.revision)
    assert listing.revision == await store.revision() >= stored.revision


async def test_a_policy_needs_a_model_and_a_stable_version(store: PolicyStore) -> None:
    with pytest.raises(InvalidInput, match="stable_version"):
        await store.put(policy_pb2.TrafficPolicy(model="tiny"), expected_revision=0)


async def test_another_gateway_sees_a_change_within_a_poll(
    store: PolicyStore, address: str
) -> None:
    other_store = PolicyStore(address)
    await other_store.start()
    other = PolicyBook(other_store, POLL_S)
    await other.start()
    try:
        delays = []
        revision = 0
        for percent in (10, 20, 30, 40, 50):
            written = time.monotonic()
            written_policy = await store.put(canary(percent, "watched"), revision)
            revision = written_policy.revision
            while (split := other.split("watched")) is None or split.canary_percent != percent:
                await asyncio.sleep(0.005)
            delays.append(time.monotonic() - written)
        print(f"policy propagation: max {max(delays) * 1000:.0f} ms over {len(delays)} changes")
        assert max(delays) < 1.0
    finally:
        await other.stop()
        await other_store.stop()


async def test_policies_survive_a_restart_of_the_cache_service(
    redis_url: str, prefix: str, redis: Redis
) -> None:
    for attempt in range(2):
        service = build(settings_for(with_db(redis_url, DB), prefix))
        await service.start()
        store = PolicyStore(f"127.0.0.1:{service.port}")
        await store.start()
        try:
            if attempt == 0:
                await store.put(canary(25, "kept"), expected_revision=0)
            else:
                book = PolicyBook(store, POLL_S)
                await book.refresh()
                split = book.split("kept")
                assert split is not None and (split.canary, split.canary_percent) == ("2", 25)
        finally:
            await store.stop()
            await service.stop()
