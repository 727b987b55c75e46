"""The gateway's client of the cache service's KeyStore."""

from __future__ import annotations

import grpc

from fmserve.v1 import keys_pb2, keys_pb2_grpc
from services.gateway.cache_service import CacheServiceClient


class KeyStore(CacheServiceClient):
    """Key records by id and name, kept by the cache service."""

    unavailable = (
        "the cache service (API keys) is unavailable, so keys cannot be checked; retry shortly"
    )

    def stub(self, channel: grpc.aio.Channel) -> keys_pb2_grpc.KeyStoreStub:
        return keys_pb2_grpc.KeyStoreStub(channel)

    async def create(self, key: keys_pb2.StoredKey) -> keys_pb2.StoredKey:
        return await self._call("CreateKey", key)

    async def get(self, key_id: str) -> keys_pb2.StoredKey:
        return await self._call("GetKey", keys_pb2.GetKeyRequest(key_id=key_id))

    async def list(self) -> list[keys_pb2.StoredKey]:
        return list((await self._call("ListKeys", keys_pb2.ListApiKeysRequest())).keys)

    async def revoke(self, name: str) -> keys_pb2.StoredKey:
        return await self._call("RevokeKey", keys_pb2.RevokeApiKeyRequest(name=name))
