"""The gateway's result cache (services/gateway/result_cache.py) and its use by the gateway's
domain (services/gateway/gateway.py), against fake stage servers on free ports.

The promise under test: the cache is optional. A miss, a store, then a hit; concurrent lookups
share a call; and a cache that is down, failing or slow counts as a miss, never as an error."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from fmserve.core.repository import ModelRepository
from fmserve.errors import Overloaded, Unavailable
from fmserve.v1 import cache_pb2, common_pb2
from services.gateway.gateway import CachePolicy, Gateway, InferCall
from services.gateway.outcomes import Outcomes
from services.gateway.pipeline import Pipeline
from services.gateway.policies import PolicyBook
from services.gateway.policy_store import PolicyStore
from services.gateway.result_cache import ResultCache
from services.gateway.routes import Router
from services.gateway.shadow import Shadow
from services.gateway.stages import StageClients
from tests.conftest import AsyncioReports
from tests.integration.stage_fakes import Fakes, closed_port_address, expected, fake_stages

pytestmark = pytest.mark.timeout(20)


def result(*values: float) -> common_pb2.Result:
    return common_pb2.Result(embedding=common_pb2.Embedding(values=values))


@dataclass
class Side:
    """The fakes, and the gateway's result cache, pipeline and domain over its stage clients."""

    fakes: Fakes
    cache: ResultCache
    gateway: Gateway

    def lookups(self) -> list[list[str]]:
        return [list(c.request.keys) for c in self.fakes.cache.calls if _is(c, "LookupRequest")]

    def stores(self) -> list[cache_pb2.StoreRequest]:
        return [c.request for c in self.fakes.cache.calls if _is(c, "StoreRequest")]

    async def stored(self, count: int) -> None:
        """Wait for the background stores to land in the fake cache."""
        deadline = time.monotonic() + 2.0
        while len(self.fakes.stored) < count:
            assert time.monotonic() < deadline, f"{len(self.fakes.stored)} of {count} stored"
            await asyncio.sleep(0.005)


def _is(call: Any, name: str) -> bool:
    return type(call.request).__name__ == name


@pytest.fixture
def repository(tmp_path: Path) -> ModelRepository:
    (tmp_path / "embedder" / "1").mkdir(parents=True)
    (tmp_path / "embedder" / "model.toml").write_text('task = "embedding"\n')
    (tmp_path / "embedder" / "1" / "config.json").write_text('{"hidden_size": 2}')
    return ModelRepository(tmp_path)


@pytest.fixture
async def make_side(repository: ModelRepository) -> AsyncIterator[Callable[..., Any]]:
    """Builds the gateway's side with settings overrides; all stopped after the test."""
    async with fake_stages() as fakes:
        resources: list[Any] = []

        async def make(**overrides: Any) -> Side:
            # A lookup timeout no busy test machine reaches, unless a test sets its own.
            settings = fakes.settings(**{"cache_timeout_s": 2.0, **overrides})
            stages = StageClients(settings)
            await stages.start()
            pipeline, cache = Pipeline(stages, settings), ResultCache(stages, settings)
            resources.extend([stages, pipeline, cache])
            router = Router(repository, settings.max_items, settings.max_text_chars)
            outcomes = Outcomes(PolicyBook(PolicyStore(settings.cache_address), 1.0))
            shadow = Shadow(pipeline, outcomes, max_in_flight=1, timeout_s=5.0)
            gateway = Gateway(router, pipeline, cache, 5.0, outcomes, shadow)
            return Side(fakes, cache, gateway)

        yield make
        for resource in reversed(resources):
            await resource.stop()


@pytest.fixture
async def side(make_side: Callable[..., Any]) -> Side:
    return await make_side()


# --- ResultCache -----------------------------------------------------------------------------


async def test_a_miss_then_a_store_then_a_hit(side: Side) -> None:
    assert await side.cache.lookup("embedder", ["k1", "k2"]) == [None, None]
    side.cache.store([("k1", result(1.0, 2.0))])
    await side.stored(1)
    hit, miss = await side.cache.lookup("embedder", ["k1", "k2"])
    assert miss is None
    assert hit is not None and list(hit.embedding.values) == [1.0, 2.0] and hit.cached


async def test_store_does_not_wait_for_the_cache(side: Side) -> None:
    gate = asyncio.Event()
    side.fakes.cache.gate = gate
    side.cache.store([("k1", result(1.0))])  # returns at once, though the cache holds the call
    await asyncio.sleep(0.05)
    assert side.fakes.stored == {}
    gate.set()
    await side.stored(1)


async def test_stores_carry_the_settings_ttl(make_side: Callable[..., Any]) -> None:
    side = await make_side(cache_ttl_s=600)
    side.cache.store([("k1", result(1.0)), ("k2", result(2.0))])
    await side.stored(2)
    assert {store.ttl_s for store in side.stores()} == {600}


async def test_one_requests_keys_are_looked_up_in_one_call(side: Side) -> None:
    keys = [f"k{i}" for i in range(10)]
    assert await side.cache.lookup("embedder", keys) == [None] * 10
    assert side.lookups() == [keys]


async def test_concurrent_lookups_share_a_call(side: Side) -> None:
    gate = asyncio.Event()
    side.fakes.cache.gate = gate
    first = asyncio.create_task(side.cache.lookup("embedder", ["first"]))
    await asyncio.sleep(0.02)
    # Four lookups may be in flight at once; the fifth call takes everything queued behind.
    waiting = [asyncio.create_task(side.cache.lookup("embedder", [f"k{i}"])) for i in range(8)]
    await asyncio.sleep(0.02)
    gate.set()
    await asyncio.gather(first, *waiting)
    assert sorted(len(keys) for keys in side.lookups()) == [1, 1, 1, 1, 5]


@pytest.mark.parametrize("error", [Unavailable("redis is down"), Overloaded("busy")])
async def test_a_failing_cache_is_a_miss(side: Side, error: Exception) -> None:
    side.fakes.stored["k1"] = result(1.0)
    side.fakes.cache.error = error
    assert await side.cache.lookup("embedder", ["k1", "k2"]) == [None, None]


async def test_a_slow_cache_is_a_miss_within_its_timeout(make_side: Callable[..., Any]) -> None:
    side = await make_side(cache_timeout_s=0.1)
    side.fakes.stored["k1"] = result(1.0)
    side.fakes.cache.delay_s = 2.0
    started = time.monotonic()
    assert await side.cache.lookup("embedder", ["k1"]) == [None]
    assert time.monotonic() - started < 0.5


async def test_a_lookup_whose_caller_gives_up_leaves_no_exception_unretrieved(
    side: Side, asyncio_reports: AsyncioReports
) -> None:
    """A request cancelled (its client went away, its deadline passed) while its lookup waits:
    the lookup's futures are cancelled and nothing is left for asyncio to log."""
    side.fakes.cache.gate = asyncio.Event()
    lookup = asyncio.create_task(side.cache.lookup("embedder", ["k1", "k2"]))
    await asyncio.sleep(0.05)
    lookup.cancel()
    with pytest.raises(asyncio.CancelledError):
        await lookup
    del lookup  # its traceback's frames hold what it waited on, which asyncio reports when freed
    side.fakes.cache.gate.set()
    assert await asyncio_reports.messages() == []


async def test_no_cache_server_is_a_miss_and_a_store_fails_quietly(
    make_side: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    side = await make_side(cache_address=closed_port_address())
    assert await side.cache.lookup("embedder", ["k1"]) == [None]
    with caplog.at_level(logging.WARNING, logger="fmserve.gateway.cache"):
        side.cache.store([("k1", result(1.0))])
        deadline = time.monotonic() + 3.0
        while not any("store failed" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the failed store was not logged"
            await asyncio.sleep(0.01)


async def test_a_store_while_stopping_is_skipped_without_an_error(
    side: Side, caplog: pytest.LogCaptureFixture
) -> None:
    await side.cache.stop()
    with caplog.at_level(logging.WARNING, logger="fmserve.gateway.cache"):
        side.cache.store([("k1", result(1.0))])  # a reply being sent as the gateway stops
    assert [r.name for r in caplog.records] == ["fmserve.gateway.cache"]
    assert side.fakes.cache.calls == []


# --- the near cache: results this gateway saw lately, answered without a call ------------------


def near_hits(model: str) -> float:
    return REGISTRY.get_sample_value("fmserve_gateway_near_cache_hits_total", {"model": model}) or 0


async def test_a_result_stored_lately_is_answered_without_a_call(side: Side) -> None:
    fresh = result(1.0, 2.0)
    side.cache.store([("k1", fresh)])
    await side.stored(1)
    before = near_hits("embedder")
    [hit] = await side.cache.lookup("embedder", ["k1"])
    assert hit is not None and list(hit.embedding.values) == [1.0, 2.0]
    assert hit.cached and not fresh.cached  # kept as the cache answers it; the caller's as it was
    assert side.lookups() == []
    assert near_hits("embedder") == before + 1


async def test_a_result_the_cache_service_found_is_kept_near(side: Side) -> None:
    side.fakes.stored["k1"] = result(3.0)  # stored by another gateway
    for _ in range(3):
        [hit] = await side.cache.lookup("embedder", ["k1"])
        assert hit is not None and list(hit.embedding.values) == [3.0] and hit.cached
    assert side.lookups() == [["k1"]]


async def test_a_near_result_expires_and_is_asked_of_the_cache_service_again(
    make_side: Callable[..., Any],
) -> None:
    side = await make_side(near_cache_ttl_s=0.2)
    side.cache.store([("k1", result(1.0))])
    await side.stored(1)
    assert (await side.cache.lookup("embedder", ["k1"]))[0] is not None
    assert side.lookups() == []
    await asyncio.sleep(0.25)
    assert (await side.cache.lookup("embedder", ["k1"]))[0] is not None
    assert side.lookups() == [["k1"]]


async def test_the_near_cache_keeps_the_most_recently_used(make_side: Callable[..., Any]) -> None:
    side = await make_side(near_cache_entries=2)
    side.cache.store([("k1", result(1.0)), ("k2", result(2.0))])
    await side.stored(2)
    await side.cache.lookup("embedder", ["k1"])  # k2 is now the least recently used
    side.cache.store([("k3", result(3.0))])
    await side.stored(3)
    assert len(side.cache.near) == 2
    found = await side.cache.lookup("embedder", ["k1", "k2", "k3"])
    assert [list(r.embedding.values) for r in found if r] == [[1.0], [2.0], [3.0]]
    assert side.lookups() == [["k2"]]


async def test_without_a_near_cache_every_lookup_asks_the_cache_service(
    make_side: Callable[..., Any],
) -> None:
    side = await make_side(near_cache_entries=0)
    side.cache.store([("k1", result(1.0))])
    await side.stored(1)
    for _ in range(2):
        assert (await side.cache.lookup("embedder", ["k1"]))[0] is not None
    assert side.lookups() == [["k1"], ["k1"]]


async def test_near_results_are_answered_while_the_cache_service_fails(side: Side) -> None:
    side.cache.store([("k1", result(1.0))])
    await side.stored(1)
    side.fakes.cache.error = Unavailable("redis is down")
    hit, miss = await side.cache.lookup("embedder", ["k1", "k2"])
    assert hit is not None and list(hit.embedding.values) == [1.0]
    assert miss is None


# --- Gateway.infer: the cache on the request path --------------------------------------------


def call(texts: list[str], policy: CachePolicy = CachePolicy.USE) -> InferCall:
    return InferCall(model="embedder", texts=texts, cache_policy=policy)


def vectors(results: list[common_pb2.Result]) -> list[list[float]]:
    return [list(r.embedding.values) for r in results]


async def test_a_repeated_request_is_answered_from_the_cache(side: Side) -> None:
    first = await side.gateway.infer(call(["a b", "c"]))
    assert vectors(first.results) == [expected("a b"), expected("c")]
    assert not first.cache_hit
    await side.stored(2)
    computed = len(side.fakes.preprocess.calls)
    again = await side.gateway.infer(call(["c", "a b"]))
    assert vectors(again.results) == [expected("c"), expected("a b")]
    assert again.cache_hit
    assert len(side.fakes.preprocess.calls) == computed  # the second request reached no stage


async def test_only_the_misses_go_to_the_stages(side: Side) -> None:
    await side.gateway.infer(call(["a b"]))
    await side.stored(1)
    answer = await side.gateway.infer(call(["new one", "a b"]))
    assert vectors(answer.results) == [expected("new one"), expected("a b")]
    assert [r.cached for r in answer.results] == [False, True]
    assert [list(c.request.texts) for c in side.fakes.preprocess.calls] == [["a b"], ["new one"]]


async def test_requests_succeed_while_the_cache_is_down(make_side: Callable[..., Any]) -> None:
    side = await make_side(cache_address=closed_port_address())
    answer = await side.gateway.infer(call(["a b", "c"]))
    assert vectors(answer.results) == [expected("a b"), expected("c")]


async def test_requests_succeed_while_the_cache_fails(side: Side) -> None:
    side.fakes.cache.error = Unavailable("redis is down")
    answer = await side.gateway.infer(call(["a b"]))
    assert vectors(answer.results) == [expected("a b")]


async def test_bypass_neither_reads_nor_writes_the_cache(side: Side) -> None:
    side.fakes.stored["unused"] = result(0.0)
    await side.gateway.infer(call(["a b"], CachePolicy.BYPASS))
    await asyncio.sleep(0.05)
    assert side.fakes.cache.calls == []


async def test_refresh_recomputes_and_overwrites(side: Side) -> None:
    await side.gateway.infer(call(["a b"]))
    await side.stored(1)
    (key,) = side.fakes.stored
    side.fakes.stored[key] = result(-1.0)  # a stale answer
    answer = await side.gateway.infer(call(["a b"], CachePolicy.REFRESH))
    assert vectors(answer.results) == [expected("a b")] and not answer.cache_hit
    deadline = time.monotonic() + 2.0
    while list(side.fakes.stored[key].embedding.values) != expected("a b"):
        assert time.monotonic() < deadline, "the refreshed result was not stored"
        await asyncio.sleep(0.005)
    assert len(side.lookups()) == 1  # only the first request looked up
