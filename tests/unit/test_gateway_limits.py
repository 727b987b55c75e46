"""What a call claims from its key's limits (services/gateway/limits.py), that a slot is given
back even when the check itself fails or the caller leaves during it, and how the client
coalesces claims (limits_client.py). The cache service is an in-memory stand-in here;
tests/integration/test_key_limits.py runs the real one."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from fmserve.errors import Unavailable
from fmserve.v1 import limits_pb2
from services.gateway.limits import MAX_MODEL_CHARS, KeyLimits
from services.gateway.limits_client import LimitsClient
from services.gateway.principal import Principal

pytestmark = pytest.mark.timeout(10)


class FakeLimits:
    """Answers Admit with `failure` raised, or admitted; records releases."""

    def __init__(self, failure: BaseException | None = None) -> None:
        self.failure = failure
        self.released: list[tuple[str, str]] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def admit(self, claim: limits_pb2.Claim) -> limits_pb2.Verdict:
        if self.failure is not None:
            raise self.failure
        return limits_pb2.Verdict(admitted=True)

    def release(self, key_id: str, call_id: str) -> None:
        self.released.append((key_id, call_id))

    async def renew(self, slots: Sequence[tuple[str, str]], lease_ms: int) -> None:
        pass


def limits(fake: FakeLimits | None = None, model_rpm: int = 0) -> KeyLimits:
    return KeyLimits(fake or FakeLimits(), 30.0, model_rpm)  # type: ignore[arg-type]


def key(**limits: int) -> Principal:
    return Principal("0123456789abcdef", "ci", ("infer:*",), False, **limits)


def test_a_key_without_limits_claims_nothing() -> None:
    assert limits().claim(key(), "m", 5) is None


def test_the_key_bucket_holds_a_minute_of_requests() -> None:
    claim = limits().claim(key(rpm=600), "m", 5)
    assert claim is not None
    assert [(b.name, b.per_minute, b.burst) for b in claim.buckets] == [("key", 600, 600)]
    assert (claim.max_concurrency, claim.call_id, claim.daily_items, claim.items) == (0, "", 0, 0)


def test_a_per_model_bucket_applies_to_calls_that_name_a_model() -> None:
    claim = limits(model_rpm=30).claim(key(), "m" * 500, 1)
    assert claim is not None
    [bucket] = claim.buckets
    assert bucket.name == "model:" + "m" * MAX_MODEL_CHARS and bucket.burst == 30
    assert limits(model_rpm=30).claim(key(), "", 1) is None  # GetJob, ListJobs ...


def test_a_slot_and_items_are_claimed_only_under_those_limits() -> None:
    claim = limits().claim(key(max_concurrency=2, daily_items=100), "m", 7)
    assert claim is not None and not claim.buckets
    assert claim.max_concurrency == 2 and len(claim.call_id) == 32
    assert (claim.daily_items, claim.items) == (100, 7)


@pytest.mark.parametrize(
    "failure", [Unavailable("down"), asyncio.CancelledError()], ids=["down", "cancelled"]
)
async def test_a_slot_is_given_back_when_the_check_fails_or_the_caller_leaves(
    failure: BaseException,
) -> None:
    fake = FakeLimits(failure)
    gate = limits(fake)
    with pytest.raises(type(failure)):
        async with gate.admit(key(max_concurrency=1), "m", 1):
            pytest.fail("admitted without an answer")
    assert [k for k, _ in fake.released] == ["0123456789abcdef"]


class SlowCache(LimitsClient):
    """The client over an in-memory cache service whose Admit answers when told to."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1:1", 5.0, 1 << 20)
        self.answer = asyncio.Event()
        self.calls: list[str] = []

    async def _call(self, method: str, request: Any) -> Any:
        self.calls.append(method)
        if method == "Admit":
            await self.answer.wait()
            verdicts = [limits_pb2.Verdict(admitted=True) for _ in request.claims]
            return limits_pb2.AdmitResponse(verdicts=verdicts)
        return limits_pb2.ReleaseResponse()


async def until_called(cache: SlowCache, method: str) -> None:
    for _ in range(100):
        if method in cache.calls:
            return
        await asyncio.sleep(0)
    pytest.fail(f"{method} was never called")


async def test_a_slot_taken_after_its_caller_left_is_given_back_once_the_check_is_over() -> None:
    cache = SlowCache()
    claim = limits_pb2.Claim(key_id="k", max_concurrency=1, call_id="c", lease_ms=1000)
    waiting = asyncio.create_task(cache.admit(claim))
    await until_called(cache, "Admit")
    waiting.cancel()  # the caller leaves while its claim is being checked
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert cache.calls == ["Admit"]  # a release now could reach Redis before the claim
    cache.answer.set()
    await until_called(cache, "Release")
    assert cache.calls == ["Admit", "Release"]


async def test_claims_made_during_a_check_go_together_in_the_next() -> None:
    cache = SlowCache()
    first = asyncio.create_task(cache.admit(limits_pb2.Claim(key_id="k")))
    await until_called(cache, "Admit")
    more = [asyncio.create_task(cache.admit(limits_pb2.Claim(key_id="k"))) for _ in range(5)]
    await asyncio.sleep(0)
    cache.answer.set()
    verdicts = await asyncio.gather(first, *more)
    assert all(v.admitted for v in verdicts) and cache.calls == ["Admit", "Admit"]
