"""Key administration behind the gateway's admin RPCs: create (the key is returned once, only
its salted hash is stored), list and revoke; and the first admin key of a new cluster.

The first admin key: with auth on and no FMSERVE_ADMIN_KEY, each gateway replica, at start,
tries to create a key named `admin`. The cache service takes a name atomically, so exactly one
replica succeeds, whatever their number, and only that one logs the key, once; on later starts
the name is taken and nothing is logged. Lost it? Set FMSERVE_ADMIN_KEY (`fmserve keys
generate`), restart the gateways, and revoke `admin`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from fmserve.core import apikeys
from fmserve.errors import AlreadyExists, InvalidInput, Unavailable
from fmserve.v1 import keys_pb2
from services.gateway import scopes
from services.gateway.keystore import KeyStore

log = logging.getLogger("fmserve.gateway.admin")

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
FIRST_ADMIN = "admin"
RETRY_S = 1.0


class KeyAdmin:
    def __init__(self, store: KeyStore) -> None:
        self.store = store

    async def create(self, request: keys_pb2.CreateApiKeyRequest) -> keys_pb2.CreateApiKeyResponse:
        info = _checked(request)
        new = apikeys.generate()
        info.key_id = new.key_id
        stored = await self.store.create(
            keys_pb2.StoredKey(info=info, salt=new.salt, hash=new.digest)
        )
        return keys_pb2.CreateApiKeyResponse(info=stored.info, api_key=new.api_key)

    async def list(self) -> list[keys_pb2.ApiKeyInfo]:
        return [stored.info for stored in await self.store.list()]

    async def revoke(self, name: str) -> keys_pb2.ApiKeyInfo:
        if not name:
            raise InvalidInput("name is required: the name of the key to revoke")
        return (await self.store.revoke(name)).info


def _checked(request: keys_pb2.CreateApiKeyRequest) -> keys_pb2.ApiKeyInfo:
    """The new key's info from a request, or InvalidInput saying what is wrong."""
    if not _NAME.match(request.name):
        raise InvalidInput("name must be 1-64 letters, digits, '.', '_' or '-'")
    if not request.scopes:
        raise InvalidInput("scopes is empty: give at least one (e.g. infer:minilm-*)")
    if min(request.rpm, request.max_concurrency, request.daily_items, request.expires_in_s) < 0:
        raise InvalidInput("rpm, max_concurrency, daily_items and expires_in_s must be >= 0")
    now = int(time.time() * 1000)
    return keys_pb2.ApiKeyInfo(
        name=request.name,
        scopes=[scopes.validate(s) for s in request.scopes],
        created_unix_ms=now,
        expires_unix_ms=now + request.expires_in_s * 1000 if request.expires_in_s else 0,
        rpm=request.rpm,
        max_concurrency=request.max_concurrency,
        daily_items=request.daily_items,
    )


class FirstAdminKey:
    """A resource: at start, creates the first admin key in the background (retrying while the
    cache service is not up yet) if no replica has before."""

    def __init__(self, admin: KeyAdmin) -> None:
        self.admin = admin
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._ensure())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _ensure(self) -> None:
        request = keys_pb2.CreateApiKeyRequest(name=FIRST_ADMIN, scopes=[scopes.ADMIN])
        while True:
            try:
                created = await self.admin.create(request)
            except AlreadyExists:
                log.info(
                    "auth is on and the first admin key exists: it was logged once, when this "
                    "cluster first started (FMSERVE_ADMIN_KEY sets one of your own)",
                    extra={"first_admin_key_exists": True},
                )
                return
            except Unavailable:
                await asyncio.sleep(RETRY_S)
                continue
            log.warning(
                "auth is on and FMSERVE_ADMIN_KEY is not set: created the first admin key, "
                "shown here once; keep it safe (FMSERVE_API_KEY=<it> fmserve keys create ...)",
                extra={"first_admin_key": created.api_key, "key_id": created.info.key_id},
            )
            return
