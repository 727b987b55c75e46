"""API key records end to end below the gateway: the cache service in-process (a real grpc.aio
server on port 0) against the real Redis, through the gateway's KeyStore client and KeyAdmin;
and the first admin key, created by exactly one of several gateways starting at once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from fmserve.core import apikeys
from fmserve.errors import AlreadyExists, InvalidInput, NotFound
from fmserve.v1 import keys_pb2
from services.cache.__main__ import build
from services.gateway.admin import FIRST_ADMIN, FirstAdminKey, KeyAdmin
from services.gateway.keyring import KeyRing
from services.gateway.keystore import KeyStore
from tests.integration.conftest import DB, settings_for, with_db

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
async def store(redis_url: str, prefix: str, redis: Redis) -> AsyncIterator[KeyStore]:
    service = build(settings_for(with_db(redis_url, DB), prefix))
    await service.start()
    keys = KeyStore(f"127.0.0.1:{service.port}")
    await keys.start()
    yield keys
    await keys.stop()
    await service.stop()


def request(name: str, *scopes: str) -> keys_pb2.CreateApiKeyRequest:
    return keys_pb2.CreateApiKeyRequest(name=name, scopes=list(scopes), rpm=600, expires_in_s=60)


async def test_a_created_key_is_stored_hashed_and_verifies(
    store: KeyStore, redis: Redis, prefix: str
) -> None:
    created = await KeyAdmin(store).create(request("ci", "infer:minilm-*", "jobs:submit"))
    key_id = apikeys.key_id_of(created.api_key)
    assert key_id == created.info.key_id and created.info.rpm == 600
    assert created.info.expires_unix_ms - created.info.created_unix_ms == 60_000
    raw = b"".join([k + v for k, v in (await redis.hgetall(f"{prefix}apikey:{key_id}")).items()])
    assert created.api_key.encode() not in raw  # only the salted hash is kept
    assert created.api_key.split("_", 2)[2].encode() not in raw
    principal = await KeyRing(store, 0.5).authenticate(created.api_key)
    assert principal.name == "ci" and principal.scopes == ("infer:minilm-*", "jobs:submit")


async def test_names_are_unique_until_revoked(store: KeyStore) -> None:
    admin = KeyAdmin(store)
    first = await admin.create(request("unique", "jobs:read"))
    with pytest.raises(AlreadyExists, match="'unique' exists already"):
        await admin.create(request("unique", "jobs:read"))
    revoked = await admin.revoke("unique")
    assert revoked.revoked and revoked.key_id == first.info.key_id
    with pytest.raises(NotFound):
        await admin.revoke("unique")
    second = await admin.create(request("unique", "jobs:read"))  # the name is free again
    listed = [k for k in await admin.list() if k.name == "unique"]
    assert [(k.key_id, k.revoked) for k in listed] == [
        (first.info.key_id, True),
        (second.info.key_id, False),
    ]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (keys_pb2.CreateApiKeyRequest(name="x", scopes=["root"]), "unknown scope"),
        (keys_pb2.CreateApiKeyRequest(name="x"), "scopes is empty"),
        (keys_pb2.CreateApiKeyRequest(name="a b", scopes=["admin"]), "name must be"),
        (keys_pb2.CreateApiKeyRequest(name="x", scopes=["admin"], rpm=-1), ">= 0"),
    ],
)
async def test_a_bad_request_is_refused_saying_why(
    store: KeyStore, bad: keys_pb2.CreateApiKeyRequest, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        await KeyAdmin(store).create(bad)


async def test_several_gateways_starting_at_once_create_one_first_admin_key_logged_once(
    store: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    starters = [FirstAdminKey(KeyAdmin(store)) for _ in range(4)]
    with caplog.at_level(logging.WARNING, logger="fmserve.gateway.admin"):
        for starter in starters:
            await starter.start()
        await asyncio.gather(*(s._task for s in starters if s._task is not None))
        for starter in starters:
            await starter.stop()
    logged = [r for r in caplog.records if hasattr(r, "first_admin_key")]
    assert len(logged) == 1
    admins = [k for k in await KeyAdmin(store).list() if k.name == FIRST_ADMIN]
    assert len(admins) == 1 and list(admins[0].scopes) == ["admin"]
    principal = await KeyRing(store, 0.5).authenticate(logged[0].first_admin_key)
    assert principal.admin
