"""What a call claims from its key's limits (services/gateway/limits.py), that a slot is given
back even when the check itself fails or the caller leaves during it, that a generation gives
back the tokens it reserved and did not spend, on every path, and how the client coalesces
claims (limits_client.py). The cache service is an in-memory stand-in here;
tests/integration/test_key_limits.py runs the real one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import pytest

from fmserve.errors import Unavailable
from fmserve.v1 import limits_pb2
from services.gateway.leases import LEASE_S, Leases, lease_size
from services.gateway.limits import MAX_MODEL_CHARS, KeyLimits, refusal
from services.gateway.limits_client import LimitsClient
from services.gateway.principal import Meter, Principal

pytestmark = pytest.mark.timeout(10)

DAY = 20_423
"""The UTC day the in-memory cache counts items on."""


class FakeLimits:
    """Answers Admit with `failure` raised, or admitted; records releases."""

    def __init__(self, failure: BaseException | None = None) -> None:
        self.failure = failure
        self.released: list[tuple[str, str]] = []
        self.refunds: list[tuple[str, int, int]] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def admit(self, claim: limits_pb2.Claim) -> limits_pb2.Verdict:
        if self.failure is not None:
            raise self.failure
        return limits_pb2.Verdict(admitted=True, day=DAY)

    def release(self, key_id: str, call_id: str) -> None:
        self.released.append((key_id, call_id))

    def refund(self, key_id: str, day: int, items: int) -> None:
        self.refunds.append((key_id, day, items))

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


class Failed(Exception):
    pass


async def generation(gate: KeyLimits, who: Principal, reserve: int, spent: int, end: str) -> None:
    """A metered call that reserves `reserve` tokens, spends `spent`, then ends as `end` says."""
    meter = Meter()
    async with gate.admit(who, "lm", reserve, meter):
        meter.spent += spent
        if end == "error":
            raise Failed
        if end == "cancel":
            raise asyncio.CancelledError


@pytest.mark.parametrize("end", ["finish", "error", "cancel"])
async def test_a_generation_gives_back_the_tokens_it_did_not_spend_however_it_ends(
    end: str,
) -> None:
    fake = FakeLimits()
    with contextlib.suppress(Failed, asyncio.CancelledError):
        await generation(limits(fake), key(daily_items=1000), 64, 9, end)
    assert fake.refunds == [("0123456789abcdef", DAY, 55)]


async def test_nothing_is_given_back_when_every_token_was_spent_or_there_is_no_quota() -> None:
    fake = FakeLimits()
    await generation(limits(fake), key(daily_items=1000), 64, 64, "finish")
    await generation(limits(fake), key(rpm=60), 64, 3, "finish")  # its claim counts no items
    assert fake.refunds == []


def test_a_generation_over_the_quota_is_told_the_tokens_it_reserved() -> None:
    who, gate = key(daily_items=100), limits()
    claim = gate.claim(who, "lm", 40)
    assert claim is not None
    verdict = limits_pb2.Verdict(reason=limits_pb2.LIMIT_REASON_QUOTA, items_used=70)
    reason, error = refusal(who, claim, verdict, metered=True)
    assert reason == "quota"
    assert "used 70 of its 100 items today (UTC)" in error.message
    assert "this generation reserves 40 tokens (max_new_tokens)" in error.message
    huge = gate.claim(who, "lm", 500)
    assert huge is not None
    assert "ask for fewer tokens" in refusal(who, huge, verdict, metered=True)[1].message


class SlowCache(LimitsClient):
    """The client over an in-memory cache service whose Admit answers when told to."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1:1", 5.0, 1 << 20)
        self.answer = asyncio.Event()
        self.calls: list[str] = []
        self.sent: list[Any] = []

    async def _call(self, method: str, request: Any) -> Any:
        self.calls.append(method)
        if method == "Admit":
            await self.answer.wait()
            verdicts = [
                limits_pb2.Verdict(admitted=True, day=DAY, taken=[b.take for b in claim.buckets])
                for claim in request.claims
            ]
            return limits_pb2.AdmitResponse(verdicts=verdicts)
        self.sent.append(request)
        return None


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


async def test_items_admitted_after_their_caller_left_are_given_back() -> None:
    cache = SlowCache()
    claim = limits_pb2.Claim(key_id="k", daily_items=100, items=30)
    waiting = asyncio.create_task(cache.admit(claim))
    await until_called(cache, "Admit")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    cache.answer.set()
    await until_called(cache, "Refund")
    assert cache.calls == ["Admit", "Refund"]
    [request] = cache.sent
    assert [(r.key_id, r.day, r.items) for r in request.refunds] == [("k", DAY, 30)]


async def test_claims_made_during_a_check_go_together_in_the_next() -> None:
    cache = SlowCache()
    first = asyncio.create_task(cache.admit(limits_pb2.Claim(key_id="k")))
    await until_called(cache, "Admit")
    more = [asyncio.create_task(cache.admit(limits_pb2.Claim(key_id="k"))) for _ in range(5)]
    await asyncio.sleep(0)
    cache.answer.set()
    verdicts = await asyncio.gather(first, *more)
    assert all(v.admitted for v in verdicts) and cache.calls == ["Admit", "Admit"]


# --- token leases ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_lease_holds_a_tenth_of_a_second_of_refill_and_small_buckets_lease_nothing() -> None:
    assert [lease_size(rpm) for rpm in (60, 599, 600, 6000, 600_000)] == [1, 1, 1, 10, 1000]
    claim = limits().claim(key(rpm=6000), "m", 1)
    assert claim is not None and [b.take for b in claim.buckets] == [10]
    # A call that needs a slot or quota items goes to the cache service anyway: it takes one.
    for limited in (key(rpm=6000, max_concurrency=2), key(rpm=6000, daily_items=9)):
        claim = limits().claim(limited, "m", 1)
        assert claim is not None and [b.take for b in claim.buckets] == [1]


def test_tokens_taken_ahead_admit_the_next_calls_until_spent_or_the_lease_ends() -> None:
    clock = Clock()
    leases = Leases(clock)
    claim = limits(model_rpm=6000).claim(key(rpm=6000), "m", 1)
    assert claim is not None and not spend(leases, claim)
    leases.keep(claim, limits_pb2.Verdict(admitted=True, taken=[10, 4]))
    assert [spend(leases, claim) for _ in range(4)] == [True, True, True, False]  # 3 model tokens
    other = limits(model_rpm=6000).claim(key(rpm=6000), "n", 1)  # another model's bucket
    assert other is not None and not spend(leases, other)
    leases.keep(other, limits_pb2.Verdict(admitted=True, taken=[1, 10]))
    assert spend(leases, other)  # 6 key tokens and 9 of model n's were left
    clock.now += LEASE_S
    assert not spend(leases, other)
    returned = {(r.bucket.name, r.tokens) for r in leases.ended()}
    assert returned == {("key", 5), ("model:n", 8)}  # model m's lease was spent: nothing back
    assert leases.ended(everything=True) == []


def spend(leases: Leases, claim: limits_pb2.Claim) -> bool:
    return leases.spend(claim.key_id, [bucket.name for bucket in claim.buckets])


def test_one_call_at_a_time_asks_for_a_buckets_lease() -> None:
    leases = Leases(Clock())
    first, second = (limits().claim(key(rpm=6000), "m", 1) for _ in range(2))
    assert first is not None and second is not None
    asking = leases.ask(first)
    leases.ask(second)
    assert [b.take for b in second.buckets] == [1]  # takes its own token only
    leases.asked(asking)
    third = limits().claim(key(rpm=6000), "m", 1)
    assert third is not None and leases.ask(third) == [("0123456789abcdef", "key")]
    assert [b.take for b in third.buckets] == [10]


async def test_tokens_taken_for_a_caller_that_left_go_back() -> None:
    cache = SlowCache()
    bucket = limits_pb2.Bucket(name="key", per_minute=6000, burst=6000, take=10)
    waiting = asyncio.create_task(cache.admit(limits_pb2.Claim(key_id="k", buckets=[bucket])))
    await until_called(cache, "Admit")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    cache.answer.set()
    await until_called(cache, "Refund")
    [request] = cache.sent
    assert [(t.key_id, t.bucket.name, t.tokens) for t in request.tokens] == [("k", "key", 10)]


async def test_a_busy_key_pays_one_check_per_lease() -> None:
    class Leasing(FakeLimits):
        def __init__(self) -> None:
            super().__init__()
            self.checks = 0

        async def admit(self, claim: limits_pb2.Claim) -> limits_pb2.Verdict:
            self.checks += 1
            taken = [b.take for b in claim.buckets]
            return limits_pb2.Verdict(admitted=True, day=DAY, taken=taken)

    fake = Leasing()
    gate = limits(fake)
    for _ in range(25):
        async with gate.admit(key(rpm=6000), "m", 1):
            pass
    assert fake.checks == 3  # 10 calls per lease


@pytest.mark.parametrize(
    ("limited", "items"), [({"max_concurrency": 2}, 1), ({"daily_items": 9}, 1)]
)
async def test_a_call_that_needs_a_slot_or_quota_items_is_checked_even_with_tokens_leased(
    limited: dict[str, int], items: int
) -> None:
    class Counting(FakeLimits):
        checks = 0

        async def admit(self, claim: limits_pb2.Claim) -> limits_pb2.Verdict:
            self.checks += 1
            return limits_pb2.Verdict(admitted=True, day=DAY, taken=[b.take for b in claim.buckets])

    fake = Counting()
    gate = limits(fake)
    leased = gate.claim(key(rpm=6000), "m", 1)  # as a tokens-only call of the key took them
    assert leased is not None
    gate.leases.keep(leased, limits_pb2.Verdict(admitted=True, taken=[10]))
    async with gate.admit(key(rpm=6000), "m", 1):
        pass
    assert fake.checks == 0  # tokens only: one of the lease's
    for _ in range(3):
        async with gate.admit(key(rpm=6000, **limited), "m", items):
            pass
    assert fake.checks == 3  # every call checked against the shared state
