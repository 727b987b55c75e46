"""From a presented API key to the `Principal` it stands for, or Unauthenticated.

A key is looked up by its key id in the cache service and verified against its salted hash
(apikeys.py); a verified key is then trusted for `cache_s` (per gateway replica), so a busy key
costs one lookup and one hash per interval, not per call. Revocation and expiry therefore take
effect within `cache_s` on every replica (expiry is also checked on every call). Only keys
that verified are cached, under the SHA-256 of the key, never the key itself; the cache is
bounded. Concurrent first calls with one key share a single lookup.

The admin key from FMSERVE_ADMIN_KEY is known here by its SHA-256, never stored: it works on a
new cluster before any key exists, and stops working when the setting changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable

from fmserve.core import apikeys
from fmserve.errors import ConfigError, NotFound, Unauthenticated
from fmserve.v1 import keys_pb2
from services.gateway import scopes
from services.gateway.keystore import KeyStore
from services.gateway.principal import Principal

MAX_CACHED = 10_000
MAX_KEY_CHARS = 256
"""Far above a real key (64 characters): anything longer is refused before it is hashed."""
NOT_VALID = "the API key is not valid (unknown, revoked or expired); ask an admin for a key"
NO_KEY = "an API key is required: send the metadata `authorization: Bearer <key>`"


def principal_of(info: keys_pb2.ApiKeyInfo) -> Principal:
    return Principal(
        key_id=info.key_id,
        name=info.name,
        scopes=tuple(info.scopes),
        admin=scopes.ADMIN in info.scopes,
        rpm=info.rpm,
        max_concurrency=info.max_concurrency,
        daily_items=info.daily_items,
    )


class KeyRing:
    def __init__(
        self,
        store: KeyStore,
        cache_s: float,
        admin_key: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.cache_s = cache_s
        self.clock = clock
        self._verified: dict[bytes, tuple[Principal, int, float]] = {}
        self._pending: dict[bytes, asyncio.Future[tuple[Principal, int]]] = {}
        self._admin = _admin(admin_key) if admin_key else None

    def known(self, api_key: str) -> Principal | None:
        """The principal of the admin key or of a key verified within `cache_s`, at once;
        None when the key must be looked up (`authenticate`). Unauthenticated when it is
        known to have expired."""
        if not api_key or len(api_key) > MAX_KEY_CHARS:
            return None
        fingerprint = _fingerprint(api_key)
        cached = self._verified.get(fingerprint)
        if cached is not None and cached[2] > self.clock():
            _check_expiry(cached[1])
            return cached[0]
        if self._admin is not None and hmac.compare_digest(fingerprint, self._admin[1]):
            return self._admin[0]
        return None

    async def authenticate(self, api_key: str) -> Principal:
        if not api_key:
            raise Unauthenticated(NO_KEY)
        if len(api_key) > MAX_KEY_CHARS:
            raise Unauthenticated(NOT_VALID)
        if (principal := self.known(api_key)) is not None:
            return principal
        principal, expires_ms = await self._verify_shared(_fingerprint(api_key), api_key)
        _check_expiry(expires_ms)
        return principal

    async def _verify_shared(self, fingerprint: bytes, api_key: str) -> tuple[Principal, int]:
        pending = self._pending.get(fingerprint)
        if pending is None:
            pending = asyncio.ensure_future(self._verify(api_key))
            self._pending[fingerprint] = pending
            pending.add_done_callback(lambda _: self._pending.pop(fingerprint, None))
        principal, expires_ms = await asyncio.shield(pending)
        if len(self._verified) >= MAX_CACHED:
            self._verified.clear()
        self._verified[fingerprint] = (principal, expires_ms, self.clock() + self.cache_s)
        return principal, expires_ms

    async def _verify(self, api_key: str) -> tuple[Principal, int]:
        key_id = apikeys.key_id_of(api_key)
        if key_id is None:
            raise Unauthenticated(NOT_VALID)
        try:
            stored = await self.store.get(key_id)
        except NotFound:
            raise Unauthenticated(NOT_VALID) from None
        if stored.info.revoked or not apikeys.verify(api_key, stored.salt, stored.hash):
            raise Unauthenticated(NOT_VALID)
        return principal_of(stored.info), stored.info.expires_unix_ms


def _admin(admin_key: str) -> tuple[Principal, bytes]:
    """The configured admin key's principal and the fingerprint to know it by."""
    key_id = apikeys.key_id_of(admin_key)
    if key_id is None:
        raise ConfigError(
            "FMSERVE_ADMIN_KEY is not an fmserve API key (fms_<16 hex>_<secret of 32+ "
            "characters>); leave it empty to have the gateway create a first admin key"
        )
    principal = Principal(key_id, "admin", (scopes.ADMIN,), admin=True)
    return principal, _fingerprint(admin_key)


def _fingerprint(api_key: str) -> bytes:
    """What a key is known by in memory, never the key itself: its SHA-256. A fast hash suffices:
    a key made by fmserve has a 256-bit secret, and the admin key, which the operator may have
    chosen, is in the gateway's environment anyway."""
    return hashlib.sha256(api_key.encode()).digest()


def _check_expiry(expires_ms: int) -> None:
    if expires_ms and expires_ms <= time.time() * 1000:
        raise Unauthenticated(NOT_VALID)
