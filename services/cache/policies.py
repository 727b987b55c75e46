"""Traffic policy records in Redis. A record is opaque bytes here (a serialized
fmserve.v1.TrafficPolicy, revision left out); this module owns their revisions, so that two
writers (two admins, or gateways rolling a canary back at once) cannot both win.

    {prefix}policies             hash    model → record
    {prefix}policies:revisions   hash    model → the revision of its record
    {prefix}policies:revision    string  the store's revision, bumped by every write

A model's revision is the store's revision at its last write, so one counter tells every
gateway that something changed (they poll it) and orders the records. Policies are few and
set by an admin: kept without a TTL, so they survive restarts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from fmserve.errors import Conflict
from services.cache.store import RedisStore

# KEYS: records, revisions, counter. ARGV: model, expected revision, record.
# The new revision, or -1 when the model's revision is not the expected one.
_PUT = """
local current = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if current ~= tonumber(ARGV[2]) then return -1 end
local revision = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], revision)
return revision
"""


@dataclass(frozen=True)
class PolicyRecord:
    model: str
    record: bytes
    revision: int


class PolicyRecords:
    """Read every policy, read the store's revision, and write one policy by compare-and-set."""

    def __init__(self, redis: RedisStore, key_prefix: str) -> None:
        self.redis = redis
        self.keys = [
            f"{key_prefix}policies",
            f"{key_prefix}policies:revisions",
            f"{key_prefix}policies:revision",
        ]
        self._put: Any = None

    async def revision(self) -> int:
        with self.redis.translated("policy revision"):
            return int(await self.redis.client.get(self.keys[2]) or 0)

    async def all(self) -> tuple[list[PolicyRecord], int]:
        """Every record and the store's revision, read in one transaction."""
        with self.redis.translated("policy list"):
            async with self.redis.client.pipeline(transaction=True) as pipe:
                pipe.hgetall(self.keys[0])
                pipe.hgetall(self.keys[1])
                pipe.get(self.keys[2])
                records, revisions, revision = await pipe.execute()
        found = [
            PolicyRecord(_text(model), cast(bytes, record), int(revisions.get(model, 0)))
            for model, record in records.items()
        ]
        return sorted(found, key=lambda r: r.model), int(revision or 0)

    async def put(self, model: str, expected_revision: int, record: bytes) -> int:
        """The record's new revision; Conflict when the model's is not `expected_revision`."""
        if self._put is None:
            self._put = self.redis.client.register_script(_PUT)
        with self.redis.translated("policy put"):
            revision = int(await self._put(keys=self.keys, args=[model, expected_revision, record]))
        if revision < 0:
            raise Conflict(
                f"the traffic policy of {model!r} changed meanwhile (another admin, or a guard "
                "rolled a canary back): read it again and retry"
            )
        return revision


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
