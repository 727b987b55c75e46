"""API key records in Redis. The records are opaque bytes here (a serialized fmserve.v1.StoredKey:
the key's info and a salted hash, never the key); this module owns their names, uniqueness and
revocation. The gateway hashes and verifies keys; the cache service only keeps them.

    {prefix}apikey:{key_id}       hash    record (the bytes), revoked ("1" or "0")
    {prefix}apikey:name:{name}    string  name → key_id, while the key is not revoked
    {prefix}apikeys               zset    key_id by creation time (ListKeys)

Keys are few and made by an admin, so records are kept without a TTL (a revoked or expired key
still lists, saying so). Creation is one script, so two gateways creating the first admin key at
once (or two admins the same name) cannot both succeed: the name is taken atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from fmserve.errors import AlreadyExists, NotFound
from services.cache.store import RedisStore

# KEYS: record, name, index. ARGV: key_id, record bytes, created ms. 1 created, 0 name taken.
_CREATE = """
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'record', ARGV[2], 'revoked', '0')
redis.call('SET', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return 1
"""

# KEYS: name. ARGV: record key prefix. The revoked key's id, or '' when the name is unknown.
_REVOKE = """
local id = redis.call('GET', KEYS[1])
if not id then return '' end
redis.call('HSET', ARGV[1] .. id, 'revoked', '1')
redis.call('DEL', KEYS[1])
return id
"""


@dataclass(frozen=True)
class KeyRecord:
    record: bytes
    """A serialized fmserve.v1.StoredKey, as the gateway sent it at creation."""
    revoked: bool


class KeyRecords:
    """Create, read, list and revoke key records in Redis."""

    def __init__(self, redis: RedisStore, key_prefix: str) -> None:
        self.redis = redis
        self.prefix = f"{key_prefix}apikey:"
        self.index = f"{key_prefix}apikeys"
        self._scripts: dict[str, Any] = {}

    def _script(self, name: str, source: str) -> Any:
        if name not in self._scripts:
            self._scripts[name] = self.redis.client.register_script(source)
        return self._scripts[name]

    async def create(self, key_id: str, name: str, created_ms: int, record: bytes) -> None:
        keys = [self.prefix + key_id, f"{self.prefix}name:{name}", self.index]
        with self.redis.translated("key create"):
            created = await self._script("create", _CREATE)(
                keys=keys, args=[key_id, record, created_ms]
            )
        if not created:
            raise AlreadyExists(
                f"an API key named {name!r} exists already; revoke it or pick another"
            )

    async def get(self, key_id: str) -> KeyRecord:
        with self.redis.translated("key get"):
            raw = await self.redis.client.hmget(self.prefix + key_id, ["record", "revoked"])
        if raw[0] is None:
            raise NotFound("no such API key")
        return KeyRecord(cast(bytes, raw[0]), raw[1] == b"1")

    async def list(self) -> list[KeyRecord]:
        with self.redis.translated("key list"):
            ids = await self.redis.client.zrange(self.index, 0, -1)
            async with self.redis.client.pipeline(transaction=False) as pipe:
                for key_id in ids:
                    pipe.hmget(self.prefix + _text(cast(bytes, key_id)), ["record", "revoked"])
                rows = await pipe.execute()
        return [KeyRecord(row[0], row[1] == b"1") for row in rows if row[0] is not None]

    async def revoke(self, name: str) -> str:
        """The revoked key's id."""
        with self.redis.translated("key revoke"):
            found = await self._script("revoke", _REVOKE)(
                keys=[f"{self.prefix}name:{name}"], args=[self.prefix]
            )
        if not found:
            raise NotFound(f"no API key named {name!r} (or it is revoked already)")
        return _text(found)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
