"""The limits' Lua script against the real Redis (database 14, a key prefix of this module's
own): token buckets (burst, refill, rate), concurrency slots with leases, daily item quotas,
and that a refused call takes nothing."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from fmserve.errors import InvalidInput
from services.cache.limits import (
    DAY_MS,
    SLOT_RETRY_MS,
    Admission,
    Bucket,
    RateLimitStore,
    Reason,
)
from services.cache.store import RedisStore
from tests.integration.conftest import DB, settings_for, with_db

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
async def store(redis_url: str, prefix: str, redis: Redis) -> AsyncIterator[RateLimitStore]:
    backend = RedisStore(settings_for(with_db(redis_url, DB), prefix))
    await backend.start()
    yield RateLimitStore(backend, prefix)
    await backend.stop()


def key() -> str:
    return uuid.uuid4().hex


def rate(key_id: str, per_minute: int, burst: int, *more: Bucket) -> Admission:
    return Admission(key_id, buckets=[Bucket("key", per_minute, burst), *more])


async def admitted(store: RateLimitStore, claim: Admission, calls: int) -> int:
    verdicts = [await store.admit(claim) for _ in range(calls)]
    return sum(v.admitted for v in verdicts)


async def test_a_fresh_bucket_admits_its_burst_then_says_when_to_retry(
    store: RateLimitStore,
) -> None:
    claim = rate(key(), per_minute=60, burst=5)
    assert await admitted(store, claim, 5) == 5
    verdict = await store.admit(claim)
    assert verdict.reason is Reason.RATE and verdict.bucket == "key"
    assert 900 <= verdict.retry_after_ms <= 1000  # one token takes a second at 60 a minute


async def test_a_bucket_refills_at_its_rate_up_to_its_burst(store: RateLimitStore) -> None:
    claim = rate(key(), per_minute=600, burst=2)  # 10 tokens a second
    assert await admitted(store, claim, 3) == 2
    await asyncio.sleep(0.5)  # 5 tokens' worth of refill, capped at the burst of 2
    assert await admitted(store, claim, 4) == 2


async def test_a_drained_bucket_admits_its_rate_over_time(store: RateLimitStore) -> None:
    # 20 a second; a burst of 2, so the level stays below it and no refill overflows.
    claim = rate(key(), per_minute=1200, burst=2)
    spans, allowed = [], 0
    while not spans or spans[-1][1] - spans[0][0] < 1.0:
        began = time.monotonic()
        allowed += (await store.admit(claim)).admitted
        spans.append((began, time.monotonic()))
        await asyncio.sleep(0.005)
    # Redis saw the first and last calls somewhere inside their spans: the refill lies between.
    shortest, longest = spans[-1][0] - spans[0][1], spans[-1][1] - spans[0][0]
    assert 2 + int(20 * shortest) <= allowed <= 2 + 20 * longest, (allowed, shortest, longest)


async def test_a_refused_call_takes_nothing_from_any_limit(
    store: RateLimitStore, redis: Redis
) -> None:
    key_id = key()
    spent = Admission(key_id, buckets=[Bucket("model:a", 60, 1)])
    assert (await store.admit(spent)).admitted
    both = rate(key_id, 60, 3, Bucket("model:a", 60, 1))
    both = Admission(key_id, both.buckets, daily_items=100, items=7)
    verdict = await store.admit(both)
    assert verdict.reason is Reason.RATE and verdict.bucket == "model:a"
    # The key's bucket still holds its whole burst, and no item was counted.
    assert await admitted(store, rate(key_id, 60, 3), 4) == 3
    assert not [k async for k in redis.scan_iter(match=f"{store.prefix}items:{key_id}:*")]


async def test_claims_sent_together_are_answered_in_order_each_on_its_own(
    store: RateLimitStore,
) -> None:
    one, other = key(), key()
    verdicts = await store.admit_many(
        [rate(one, 60, 1), rate(other, 60, 2), rate(one, 60, 1), rate(other, 60, 2)]
    )
    # The second claim of `one` saw the first take its only token.
    assert [v.admitted for v in verdicts] == [True, True, False, True]
    assert verdicts[2].reason is Reason.RATE and verdicts[2].bucket == "key"
    assert await store.admit_many([]) == []


async def test_buckets_expire_once_they_would_be_full_again(
    store: RateLimitStore, redis: Redis
) -> None:
    key_id = key()
    assert (await store.admit(rate(key_id, 60, 10))).admitted
    ttl_ms = await redis.pttl(store.bucket_key(key_id, "key"))
    assert 9_000 < ttl_ms <= 10_000  # 10 tokens at one a second


async def test_concurrency_slots_are_limited_and_released(store: RateLimitStore) -> None:
    key_id = key()

    def call(call_id: str) -> Admission:
        return Admission(key_id, max_concurrency=2, call_id=call_id, lease_ms=10_000)

    assert (await store.admit(call("a"))).admitted
    assert (await store.admit(call("b"))).admitted
    refused = await store.admit(call("c"))
    assert refused.reason is Reason.CONCURRENCY and refused.retry_after_ms == SLOT_RETRY_MS
    await store.release([(key_id, "a")])
    await store.release([(key_id, "a")])  # twice is harmless
    assert (await store.admit(call("c"))).admitted
    assert not (await store.admit(call("d"))).admitted


async def test_a_slot_nobody_releases_is_freed_when_its_lease_ends(store: RateLimitStore) -> None:
    key_id = key()
    claim = Admission(key_id, max_concurrency=1, call_id="lost", lease_ms=200)
    assert (await store.admit(claim)).admitted
    assert not (await store.admit(Admission(key_id, max_concurrency=1, call_id="x"))).admitted
    await asyncio.sleep(0.3)
    assert (await store.admit(Admission(key_id, max_concurrency=1, call_id="x"))).admitted


async def test_a_renewed_slot_outlives_its_first_lease_and_a_released_one_stays_free(
    store: RateLimitStore, redis: Redis
) -> None:
    key_id, other = key(), key()
    assert await store.admit(Admission(key_id, max_concurrency=1, call_id="a", lease_ms=300))
    assert await store.admit(Admission(other, max_concurrency=1, call_id="b", lease_ms=300))
    await store.release([(other, "b")])
    await asyncio.sleep(0.2)
    await store.renew([(key_id, "a"), (other, "b")], 1000)
    await asyncio.sleep(0.3)  # past the first lease
    assert not (await store.admit(Admission(key_id, max_concurrency=1, call_id="c"))).admitted
    assert await redis.zscore(store.slots_key(other), "b") is None  # renewal did not revive it


async def test_the_daily_quota_counts_items_and_resets_at_midnight_utc(
    store: RateLimitStore, redis: Redis
) -> None:
    key_id = key()

    def items(n: int) -> Admission:
        return Admission(key_id, daily_items=10, items=n)

    assert (await store.admit(items(6))).admitted
    refused = await store.admit(items(5))
    assert refused.reason is Reason.QUOTA and refused.items_used == 6
    now_ms = time.time() * 1000
    until_midnight_ms = DAY_MS - now_ms % DAY_MS
    assert abs(refused.retry_after_ms - until_midnight_ms) < 2000
    assert (await store.admit(items(4))).admitted
    assert not (await store.admit(items(1))).admitted
    # Each UTC day counts in a key of its own, kept two days at most: tomorrow starts at 0.
    [today] = [k async for k in redis.scan_iter(match=f"{store.prefix}items:{key_id}:*")]
    day = int(today.decode().rsplit(":", 1)[1])
    assert day == int(now_ms // DAY_MS) and await redis.get(today) == b"10"
    assert 0 < await redis.pttl(today) <= 2 * DAY_MS
    await redis.rename(today, f"{store.prefix}items:{key_id}:{day - 1}")  # as if a day passed
    assert (await store.admit(items(10))).admitted


async def test_a_refund_gives_back_items_to_the_day_they_were_counted_on(
    store: RateLimitStore, redis: Redis
) -> None:
    key_id = key()

    def tokens(n: int) -> Admission:
        return Admission(key_id, daily_items=100, items=n)

    reserved = await store.admit(tokens(64))  # a generation's max_new_tokens
    assert reserved.admitted and reserved.day == int(time.time() * 1000 // DAY_MS)
    assert not (await store.admit(tokens(40))).admitted
    await store.refund([(key_id, reserved.day, 55)])  # it generated 9
    assert await redis.get(store.quota_key(key_id, reserved.day)) == b"9"
    ttl = await redis.pttl(store.quota_key(key_id, reserved.day))
    assert 0 < ttl <= 2 * DAY_MS  # the count keeps its expiry
    assert (await store.admit(tokens(91))).admitted
    assert not (await store.admit(tokens(1))).admitted
    # A count never goes below 0, and a day already gone is not brought back.
    await store.refund([(key_id, reserved.day, 500), (key_id, reserved.day - 3, 5)])
    assert await redis.get(store.quota_key(key_id, reserved.day)) == b"0"
    assert await redis.get(store.quota_key(key_id, reserved.day - 3)) is None
    with pytest.raises(InvalidInput, match="refund of -1 items"):
        await store.refund([(key_id, reserved.day, -1)])


async def test_a_claim_takes_up_to_its_take_and_unspent_tokens_go_back(
    store: RateLimitStore, redis: Redis
) -> None:
    key_id, bucket = key(), Bucket("key", 60, 25, take=10)  # one token a second
    verdicts = [await store.admit(Admission(key_id, [bucket])) for _ in range(4)]
    assert [v.taken for v in verdicts] == [(10,), (10,), (5,), (0,)]  # what was there; then none
    assert verdicts[3].reason is Reason.RATE
    await store.give_back([(key_id, bucket, 7)])
    tokens = float(await redis.hget(store.bucket_key(key_id, "key"), "tokens") or 0)
    assert 7 <= tokens < 7.5
    await store.give_back([(key_id, bucket, 100)])  # never over the burst
    assert float(await redis.hget(store.bucket_key(key_id, "key"), "tokens") or 0) == 25
    await store.give_back([(key(), bucket, 3)])  # an absent bucket is full: nothing to do
    with pytest.raises(InvalidInput, match="give-back of -1 tokens"):
        await store.give_back([(key_id, bucket, -1)])


async def test_claims_the_script_cannot_apply_are_refused_before_redis(
    store: RateLimitStore,
) -> None:
    with pytest.raises(InvalidInput, match="must be positive"):
        await store.admit(rate(key(), per_minute=0, burst=1))
    with pytest.raises(InvalidInput, match="call_id"):
        await store.admit(Admission(key(), max_concurrency=1))
    with pytest.raises(InvalidInput, match="key_id"):
        await store.admit(Admission(""))
