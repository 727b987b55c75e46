"""The gateway's per-key limits (services/gateway/limits.py) against a real cache service
in-process and the real Redis (database 14, this module's key prefix): refusals with a retry
time, counted per key name; concurrency slots given back on every path (success, error, the
caller cancelling, a deadline passing) and renewed while held; keys without limits never
calling the cache service; and limits failing closed when Redis or the cache service is down
(a Redis of the test's own, on a free port, stopped)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from fmserve.cli.cluster import free_port
from fmserve.core import context
from fmserve.errors import DeadlineExceeded, RateLimited, Unavailable
from services.cache.__main__ import build
from services.gateway.leases import LEASE_S
from services.gateway.limits import KeyLimits
from services.gateway.limits_client import LimitsClient
from services.gateway.principal import Meter, Principal
from tests.conftest import require_binary
from tests.integration.conftest import DB, settings_for, with_db

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def cache_service(url: str, prefix: str) -> AsyncIterator[int]:
    service = build(settings_for(url, prefix))
    await service.start()
    try:
        yield service.port
    finally:
        await service.stop()


@contextlib.asynccontextmanager
async def key_limits(
    port: int, lease_s: float = 30.0, model_rpm: int = 0, timeout_s: float = 0.5
) -> AsyncIterator[KeyLimits]:
    limits = KeyLimits(LimitsClient(f"127.0.0.1:{port}", timeout_s, 1 << 20), lease_s, model_rpm)
    await limits.start()
    try:
        yield limits
    finally:
        await limits.stop()


@pytest.fixture(scope="module")
async def cache_port(redis_url: str, prefix: str, redis: Redis) -> AsyncIterator[int]:
    async with cache_service(with_db(redis_url, DB), prefix) as port:
        yield port


@pytest.fixture
async def limits(cache_port: int) -> AsyncIterator[KeyLimits]:
    async with key_limits(cache_port) as limits:
        yield limits


def principal(**limits: int) -> Principal:
    key_id, name = uuid.uuid4().hex[:16], f"test-{uuid.uuid4().hex[:8]}"
    return Principal(key_id, name, ("infer:*",), False, **limits)


def refusals(who: Principal, reason: str) -> float:
    labels = {"key_name": who.name, "reason": reason}
    return REGISTRY.get_sample_value("fmserve_gateway_limit_refusals_total", labels) or 0.0


async def slots_held(redis: Redis, prefix: str, who: Principal) -> int:
    return int(await redis.zcard(f"{prefix}limits:slots:{who.key_id}"))


async def eventually_free(redis: Redis, prefix: str, who: Principal) -> None:
    """Slots are given back in the background (the answer does not wait): within a second."""
    for _ in range(100):
        if await slots_held(redis, prefix, who) == 0:
            return
        await asyncio.sleep(0.01)
    pytest.fail("the slot was not given back")


async def test_over_its_rpm_a_key_is_refused_with_a_retry_time_and_counted(
    limits: KeyLimits,
) -> None:
    who = principal(rpm=3)
    for _ in range(3):
        async with limits.admit(who, "minilm-embed", 1):
            pass
    with pytest.raises(RateLimited, match="limit of 3 requests per minute") as refused:
        async with limits.admit(who, "minilm-embed", 1):
            pass
    assert 0 < refused.value.retry_after_ms <= 20_000  # one token in 20 s at 3 a minute
    assert who.name in refused.value.message and who.key_id not in refused.value.message
    assert refusals(who, "rate") == 1


def admit_calls() -> float:
    labels = {"method": "Admit", "model": "-", "code": "OK"}
    return REGISTRY.get_sample_value("fmserve_cache_requests_total", labels) or 0.0


async def test_calls_arriving_together_are_checked_together_each_on_its_own(
    limits: KeyLimits,
) -> None:
    who, before = principal(rpm=20), admit_calls()

    async def call() -> bool:
        try:
            async with limits.admit(who, "m", 1):
                return True
        except RateLimited:
            return False

    admitted = await asyncio.gather(*(call() for _ in range(32)))
    assert sum(admitted) == 20 and refusals(who, "rate") == 12
    assert admit_calls() - before < 32 / 4  # coalesced: one Admit call for many claims


async def test_a_key_may_be_limited_per_model_too(cache_port: int) -> None:
    who = principal(rpm=100)
    async with key_limits(cache_port, model_rpm=2) as limits:
        for _ in range(2):
            async with limits.admit(who, "a", 1):
                pass
        with pytest.raises(RateLimited, match="to model 'a'"):
            async with limits.admit(who, "a", 1):
                pass
        async with limits.admit(who, "b", 1):
            pass
    assert refusals(who, "model_rate") == 1


async def test_a_busy_key_takes_a_lease_of_tokens_and_gives_back_what_it_did_not_spend(
    limits: KeyLimits, redis: Redis, prefix: str
) -> None:
    who = principal(rpm=600_000)  # 10,000 a second: a lease of 1,000 tokens
    bucket = f"{prefix}limits:rate:{who.key_id}:key"
    for _ in range(50):
        async with limits.admit(who, "m", 1):
            pass
    # One check took 1,000 tokens; the other 49 calls spent them here, without a check.
    tokens, taken_ms = await redis.hmget(bucket, ["tokens", "ms"])
    assert float(tokens) == 599_000
    await asyncio.sleep(2 * LEASE_S)  # the lease ends and its 951 unspent tokens go back
    for _ in range(100):
        if await redis.hget(bucket, "ms") != taken_ms:  # written again: the give-back
            assert float(await redis.hget(bucket, "tokens") or 0) > 599_000
            return
        await asyncio.sleep(0.01)
    pytest.fail("the lease's unspent tokens were not given back")


async def test_the_daily_quota_counts_a_calls_items(limits: KeyLimits) -> None:
    who = principal(daily_items=10)
    async with limits.admit(who, "m", 8):
        pass
    with pytest.raises(RateLimited, match="used 8 of its 10 items today"):
        async with limits.admit(who, "m", 3):
            pass
    with pytest.raises(RateLimited, match="this call brings 11: split it"):
        async with limits.admit(who, "m", 11):
            pass
    assert refusals(who, "quota") == 2


async def generated(limits: KeyLimits, who: Principal, reserve: int, spent: int) -> int:
    """A generation that reserves `reserve` tokens and spends `spent`, admitted as soon as the
    quota allows (what earlier ones did not spend is given back in the background); the
    refusals before that."""
    for refused in range(100):
        with contextlib.suppress(RateLimited):
            meter = Meter()
            async with limits.admit(who, "lm", reserve, meter):
                meter.spent += spent
            return refused
        await asyncio.sleep(0.01)
    pytest.fail(f"{reserve} tokens never fit: what was not spent was not given back")


async def test_a_generation_reserves_its_tokens_and_gives_back_what_it_did_not_spend(
    limits: KeyLimits,
) -> None:
    who = principal(daily_items=100)
    meter = Meter()
    async with limits.admit(who, "lm", 64, meter):
        meter.spent += 9  # it stopped early
        with pytest.raises(RateLimited, match=r"used 64 of its 100 items.*reserves 40 tokens"):
            async with limits.admit(who, "lm", 40, Meter()):
                pass
    waited = await generated(limits, who, 91, 0)  # fits once 55 are back; spends nothing
    waited += await generated(limits, who, 91, 91)  # fits once those 91 are back
    with pytest.raises(RateLimited, match="used 100 of its 100"):
        async with limits.admit(who, "lm", 1, Meter()):
            pass
    assert refusals(who, "quota") == 2 + waited


async def test_a_slot_is_given_back_after_success_and_after_an_error(
    limits: KeyLimits, redis: Redis, prefix: str
) -> None:
    who = principal(max_concurrency=1)
    async with limits.admit(who, "m", 1):
        assert await slots_held(redis, prefix, who) == 1
        with pytest.raises(RateLimited, match="already has 1 calls running"):
            async with limits.admit(who, "m", 1):
                pass
    await eventually_free(redis, prefix, who)
    with pytest.raises(ValueError):
        async with limits.admit(who, "m", 1):
            raise ValueError("the handler failed")
    await eventually_free(redis, prefix, who)
    assert refusals(who, "concurrency") == 1


async def test_a_slot_is_given_back_when_the_call_is_cancelled(
    limits: KeyLimits, redis: Redis, prefix: str
) -> None:
    who = principal(max_concurrency=1)
    entered = asyncio.Event()

    async def call() -> None:
        async with limits.admit(who, "m", 1):
            entered.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(call())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually_free(redis, prefix, who)


@contextlib.asynccontextmanager
async def slow_server(limits: KeyLimits, who: Principal) -> AsyncIterator[grpc.aio.Channel]:
    """A gRPC server whose one method holds a slot for 30 s, and a channel to it."""

    async def hold(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async with limits.admit(who, "m", 1):
            await asyncio.sleep(30)
        return b""

    handler = grpc.method_handlers_generic_handler(
        "test.Slow", {"Hold": grpc.unary_unary_rpc_method_handler(hold)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    await server.stop(0)


async def test_a_slot_is_given_back_when_the_deadline_passes_or_the_client_leaves(
    limits: KeyLimits, redis: Redis, prefix: str
) -> None:
    who = principal(max_concurrency=1)
    async with slow_server(limits, who) as channel:
        hold = channel.unary_unary("/test.Slow/Hold")
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await hold(b"", timeout=0.5)
        assert failed.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await eventually_free(redis, prefix, who)
        call = hold(b"")
        for _ in range(100):
            if await slots_held(redis, prefix, who):
                break
            await asyncio.sleep(0.01)
        call.cancel()
        await eventually_free(redis, prefix, who)


async def test_a_slot_taken_for_a_caller_that_left_during_the_check_is_given_back(
    limits: KeyLimits, redis: Redis, prefix: str
) -> None:
    who = principal(max_concurrency=1)
    for _ in range(5):  # out of time once the claim is sent, before its answer is back
        context.set_deadline_from(0.003)
        with contextlib.suppress(DeadlineExceeded):
            async with limits.admit(who, "m", 1):
                pass
        context.deadline.set(None)
        await eventually_free(redis, prefix, who)


async def test_a_running_call_keeps_its_slot_past_the_first_lease(
    cache_port: int, redis: Redis, prefix: str
) -> None:
    who = principal(max_concurrency=1)
    async with key_limits(cache_port, lease_s=0.3) as limits:
        async with limits.admit(who, "m", 1):
            await asyncio.sleep(0.8)  # the lease was renewed at 0.1, 0.2 ... s
            with pytest.raises(RateLimited):
                async with limits.admit(who, "m", 1):
                    pass
        await eventually_free(redis, prefix, who)


async def test_a_key_without_limits_never_calls_the_cache_service() -> None:
    # Never started: any call to the cache service would fail with Unavailable.
    limits = KeyLimits(LimitsClient(f"127.0.0.1:{free_port()}", 0.5, 1 << 20), 30.0, 0)
    async with limits.admit(principal(), "m", 1_000_000):
        pass


async def test_a_limited_key_is_refused_when_the_cache_service_is_down() -> None:
    who = principal(rpm=100)
    async with key_limits(free_port(), timeout_s=0.3) as limits:
        started = time.monotonic()
        with pytest.raises(Unavailable, match="limits cannot be checked"):
            async with limits.admit(who, "m", 1):
                pass
        assert time.monotonic() - started < 1.0
    assert refusals(who, "unavailable") == 1


@pytest.fixture
def own_redis() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A Redis of the test's own on a free port (no persistence), killed after."""
    port = free_port()
    server = subprocess.Popen(
        [require_binary("redis-server", "redis-server"), "--port", str(port), "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    yield server, port
    server.kill()
    server.wait()


async def test_limits_fail_closed_when_redis_stops_and_unlimited_keys_go_on(
    own_redis: tuple[subprocess.Popen[bytes], int],
) -> None:
    server, port = own_redis
    limited, free = principal(rpm=100, max_concurrency=5), principal()
    async with contextlib.AsyncExitStack() as stack:
        cache_port = await stack.enter_async_context(
            cache_service(f"redis://127.0.0.1:{port}/0", "test:")
        )
        limits = await stack.enter_async_context(key_limits(cache_port))
        await _until_admitted(limits, limited)
        server.terminate()
        server.wait()
        with pytest.raises(Unavailable, match="limits cannot be checked"):
            async with limits.admit(limited, "m", 1):
                pass
        async with limits.admit(free, "m", 1):
            pass


async def _until_admitted(limits: KeyLimits, who: Principal) -> None:
    """Redis takes a moment to listen after its process starts."""
    for _ in range(100):
        with contextlib.suppress(Unavailable):
            async with limits.admit(who, "m", 1):
                return
        await asyncio.sleep(0.05)
    pytest.fail("the test's own Redis never answered")
