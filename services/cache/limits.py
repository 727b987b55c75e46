"""Per-key limits in Redis: token buckets, concurrency slots and daily item quotas, checked and
taken together by one Lua script (EVALSHA; redis-py loads it once and again only if Redis lost
it), so concurrent gateway replicas never admit more than the limits allow. One script call
takes a batch of claims (the calls a gateway saw arrive together), each all or nothing. Time
is Redis's own (`TIME`), so replicas with drifting clocks agree.

    {prefix}limits:rate:{key_id}:{bucket}   hash   tokens (float), ms (last update)
    {prefix}limits:slots:{key_id}           zset   call id by its slot's lease end (ms)
    {prefix}limits:items:{key_id}:{day}     string items admitted on that UTC day (day number)

Every key is bounded: a bucket expires once it would have refilled to full (an absent bucket
is full), the slots set once its last lease ends, a day's count two days after it began.
A slot whose gateway died is gone when its lease ends (renewed while its call runs).
The quota key is built in the script from Redis's day (a single Redis instance allows it;
Redis Cluster would need hash tags).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from fmserve.errors import InvalidInput
from services.cache.store import RedisStore

DAY_MS = 86_400_000
SLOT_RETRY_MS = 100
"""What a call refused for concurrency is told to wait: slots free as calls end, which the
script cannot foresee; a short wait suits calls of the sync path."""


class Reason(IntEnum):
    """Why a call was refused (the script's first return value; 0 admitted)."""

    ADMITTED = 0
    RATE = 1
    CONCURRENCY = 2
    QUOTA = 3


@dataclass(frozen=True)
class Bucket:
    """A token bucket: `burst` tokens at most, refilled at `per_minute` / 60 per second. A
    claim needs one token, and takes up to `take` when the bucket has them (a gateway's
    lease: it spends the rest on the key's next calls, and gives back what it does not)."""

    name: str
    per_minute: int
    burst: int
    take: int = 1


@dataclass(frozen=True)
class Admission:
    """One call's claim: buckets to take a token from, a slot, and items of the day's quota."""

    key_id: str
    buckets: Sequence[Bucket] = ()
    max_concurrency: int = 0
    call_id: str = ""
    lease_ms: int = 30_000
    daily_items: int = 0
    items: int = 0


@dataclass(frozen=True)
class Verdict:
    reason: Reason
    bucket: str = ""
    retry_after_ms: int = 0
    items_used: int = 0
    day: int = 0
    """The UTC day (Redis's) the claim's items were counted on: where a refund goes."""
    taken: tuple[int, ...] = ()
    """Tokens taken from each of the claim's buckets (0s when refused)."""

    @property
    def admitted(self) -> bool:
        return self.reason is Reason.ADMITTED


# Claims one after another, each all or nothing. Per claim, KEYS: its slots set, then one key
# per bucket; ARGV: its bucket count, call id, lease (ms), max concurrency, daily items, items,
# quota key without its day, then per bucket: per minute, burst, take.
# Returns per claim {reason, bucket index (1-based, RATE), retry after (ms), items used today
# (QUOTA), day, then per bucket the tokens taken}, flat. Every limit of a claim is checked
# before any is taken, so a refused claim takes nothing.
_ADMIT = f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local day = math.floor(now / {DAY_MS})
local function admit(k, a, buckets)
  local levels = {{}}
  local function answer(reason, index, retry, used)
    local out = {{reason, index, retry, used, day}}
    for j = 1, buckets do out[5 + j] = levels[j] and levels[j][3] or 0 end
    return out
  end
  local slots, call, lease = KEYS[k], ARGV[a], tonumber(ARGV[a + 1])
  local max_slots, quota_limit = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local items, quota = tonumber(ARGV[a + 4]), ARGV[a + 5] .. day
  if max_slots > 0 then
    redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
    if redis.call('ZCARD', slots) >= max_slots then
      return answer({Reason.CONCURRENCY}, 0, {SLOT_RETRY_MS}, 0)
    end
  end
  for j = 1, buckets do
    local rate = tonumber(ARGV[a + 3 + 3 * j]) / 60000
    local burst = tonumber(ARGV[a + 4 + 3 * j])
    local saved = redis.call('HMGET', KEYS[k + j], 'tokens', 'ms')
    local tokens = burst
    if saved[1] then
      tokens = math.min(burst, tonumber(saved[1]) + math.max(0, now - tonumber(saved[2])) * rate)
    end
    if tokens < 1 then
      levels = {{}}
      return answer({Reason.RATE}, j, math.ceil((1 - tokens) / rate), 0)
    end
    local take = math.min(math.max(1, tonumber(ARGV[a + 5 + 3 * j])), math.floor(tokens))
    levels[j] = {{tokens - take, math.ceil(burst / rate), take}}
  end
  if quota_limit > 0 then
    local used = tonumber(redis.call('GET', quota) or '0')
    if used + items > quota_limit then
      levels = {{}}
      return answer({Reason.QUOTA}, 0, (day + 1) * {DAY_MS} - now, used)
    end
    redis.call('INCRBY', quota, items)
    redis.call('PEXPIRE', quota, 2 * {DAY_MS})
  end
  for j = 1, buckets do
    redis.call('HSET', KEYS[k + j], 'tokens', tostring(levels[j][1]), 'ms', now)
    redis.call('PEXPIRE', KEYS[k + j], levels[j][2])
  end
  if max_slots > 0 then
    redis.call('ZADD', slots, now + lease, call)
    redis.call('PEXPIRE', slots, lease)
  end
  return answer({Reason.ADMITTED}, 0, 0, 0)
end
local verdicts, k, a = {{}}, 1, 1
while a <= #ARGV do
  local buckets = tonumber(ARGV[a])
  for _, value in ipairs(admit(k, a + 1, buckets)) do verdicts[#verdicts + 1] = value end
  k, a = k + 1 + buckets, a + 7 + 3 * buckets
end
return verdicts
"""

# KEYS: quota keys (a day's count each). ARGV: items to give back, one per key. A count never
# goes below 0, and a day whose count has expired stays gone.
_REFUND = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    if redis.call('DECRBY', KEYS[i], ARGV[i]) < 0 then
      redis.call('SET', KEYS[i], 0, 'KEEPTTL')
    end
  end
end
return 0
"""

# KEYS: bucket keys. ARGV per key: per minute, burst, tokens to give back. A bucket gets its
# refill so far plus the tokens, up to its burst; an absent bucket is full already.
_GIVE_BACK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do
  local rate, burst = tonumber(ARGV[3 * i - 2]) / 60000, tonumber(ARGV[3 * i - 1])
  local saved = redis.call('HMGET', KEYS[i], 'tokens', 'ms')
  if saved[1] then
    local refilled = tonumber(saved[1]) + math.max(0, now - tonumber(saved[2])) * rate
    local tokens = math.min(burst, refilled + tonumber(ARGV[3 * i]))
    redis.call('HSET', KEYS[i], 'tokens', tostring(tokens), 'ms', now)
  end
end
return 0
"""

# KEYS: slots sets. ARGV: lease (ms), then one call id per key. Extends only slots still held.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 1, #KEYS do
  if redis.call('ZADD', KEYS[i], 'XX', 'CH', now + lease, ARGV[i + 1]) == 1 then
    redis.call('PEXPIRE', KEYS[i], lease)
  end
end
return 0
"""


class RateLimitStore:
    """Admits, releases and renews calls against the limits kept in Redis."""

    def __init__(self, redis: RedisStore, key_prefix: str) -> None:
        self.redis = redis
        self.prefix = f"{key_prefix}limits:"
        self._scripts: dict[str, Any] = {}

    async def admit_many(self, claims: Sequence[Admission]) -> list[Verdict]:
        """Each claim admitted or refused on its own, in order, all in one script call."""
        keys: list[str] = []
        args: list[Any] = []
        for claim in claims:
            check(claim)
            keys += [self.slots_key(claim.key_id)]
            keys += [self.bucket_key(claim.key_id, b.name) for b in claim.buckets]
            args += [len(claim.buckets), claim.call_id, claim.lease_ms, claim.max_concurrency]
            args += [claim.daily_items, claim.items, self.quota_prefix(claim.key_id)]
            args += [n for b in claim.buckets for n in (b.per_minute, b.burst, b.take)]
        if not claims:
            return []
        with self.redis.translated("limits admit"):
            flat = await self._script(_ADMIT)(keys=keys, args=args)
        verdicts, at = [], 0
        for claim in claims:
            size = 5 + len(claim.buckets)
            verdicts.append(_verdict(claim, flat[at : at + size]))
            at += size
        return verdicts

    async def admit(self, claim: Admission) -> Verdict:
        return (await self.admit_many([claim]))[0]

    async def release(self, slots: Sequence[tuple[str, str]]) -> None:
        """Give back (key id, call id) slots, in one round trip."""
        if not slots:
            return
        with self.redis.translated("limits release"):
            async with self.redis.client.pipeline(transaction=False) as pipe:
                for key_id, call_id in slots:
                    pipe.zrem(self.slots_key(key_id), call_id)
                await pipe.execute()

    async def renew(self, slots: Sequence[tuple[str, str]], lease_ms: int) -> None:
        """Extend the leases of (key id, call id) slots still held; released ones stay gone."""
        if lease_ms <= 0:
            raise InvalidInput(f"lease_ms is {lease_ms}; give a positive number of milliseconds")
        if not slots:
            return
        keys = [self.slots_key(key_id) for key_id, _ in slots]
        with self.redis.translated("limits renew"):
            await self._script(_RENEW)(keys=keys, args=[lease_ms, *(c for _, c in slots)])

    async def refund(self, refunds: Sequence[tuple[str, int, int]]) -> None:
        """Give back (key id, day, items) counted against a day's quota and not used."""
        for key_id, _, items in refunds:
            if not key_id or items < 0:
                raise InvalidInput(f"a refund of {items} items to key id {key_id!r}; give both")
        if not refunds:
            return
        keys = [self.quota_key(key_id, day) for key_id, day, _ in refunds]
        with self.redis.translated("limits refund"):
            await self._script(_REFUND)(keys=keys, args=[items for _, _, items in refunds])

    async def give_back(self, returns: Sequence[tuple[str, Bucket, int]]) -> None:
        """Give back (key id, bucket, tokens) taken ahead and not spent."""
        for key_id, bucket, tokens in returns:
            check(Admission(key_id, [bucket]))
            if tokens < 0:
                raise InvalidInput(f"a give-back of {tokens} tokens; give 0 or more")
        if not returns:
            return
        keys = [self.bucket_key(key_id, bucket.name) for key_id, bucket, _ in returns]
        args = [n for _, b, tokens in returns for n in (b.per_minute, b.burst, tokens)]
        with self.redis.translated("limits give back"):
            await self._script(_GIVE_BACK)(keys=keys, args=args)

    def quota_key(self, key_id: str, day: int) -> str:
        return f"{self.quota_prefix(key_id)}{day}"

    def quota_prefix(self, key_id: str) -> str:
        return f"{self.prefix}items:{key_id}:"

    def slots_key(self, key_id: str) -> str:
        return f"{self.prefix}slots:{key_id}"

    def bucket_key(self, key_id: str, bucket: str) -> str:
        return f"{self.prefix}rate:{key_id}:{bucket}"

    def _script(self, source: str) -> Any:
        if source not in self._scripts:
            self._scripts[source] = self.redis.client.register_script(source)
        return self._scripts[source]


def _verdict(claim: Admission, values: Sequence[Any]) -> Verdict:
    reason, index, retry_ms, used, day, *taken = (int(v) for v in values)
    bucket = claim.buckets[index - 1].name if index > 0 else ""
    return Verdict(Reason(reason), bucket, retry_ms, used, day, tuple(taken))


def check(claim: Admission) -> None:
    """Refuse a claim the script could not apply (a bucket that never refills, a slot with no
    lease) before Redis sees it."""
    if not claim.key_id:
        raise InvalidInput("key_id is empty; limits are kept per API key id")
    for bucket in claim.buckets:
        if bucket.per_minute <= 0 or bucket.burst <= 0:
            raise InvalidInput(
                f"bucket {bucket.name!r} has per_minute {bucket.per_minute} and burst "
                f"{bucket.burst}; both must be positive (send no bucket for no rate limit)"
            )
    if claim.max_concurrency > 0 and (not claim.call_id or claim.lease_ms <= 0):
        raise InvalidInput("a concurrency slot needs a call_id and a positive lease_ms")
    if claim.items < 0:
        raise InvalidInput(f"items is {claim.items}; give 0 or more")
