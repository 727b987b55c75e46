"""The gateway's client of the cache service's KeyStore: the one boundary that sees those
calls' gRPC errors (they leave as fmserve errors)."""

from __future__ import annotations

from typing import Any

import grpc

from fmserve.errors import Unavailable, from_rpc_error
from fmserve.rpc.channels import open_channel
from fmserve.v1 import keys_pb2, keys_pb2_grpc

CALL_TIMEOUT_S = 2.0


class KeyStore:
    """Key records by id and name, kept by the cache service. `start()` opens the channel."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        self._channel = open_channel(self.address)
        self._stub = keys_pb2_grpc.KeyStoreStub(self._channel)

    async def stop(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def create(self, key: keys_pb2.StoredKey) -> keys_pb2.StoredKey:
        return await self._call("CreateKey", key)

    async def get(self, key_id: str) -> keys_pb2.StoredKey:
        return await self._call("GetKey", keys_pb2.GetKeyRequest(key_id=key_id))

    async def list(self) -> list[keys_pb2.StoredKey]:
        return list((await self._call("ListKeys", keys_pb2.ListApiKeysRequest())).keys)

    async def revoke(self, name: str) -> keys_pb2.StoredKey:
        return await self._call("RevokeKey", keys_pb2.RevokeApiKeyRequest(name=name))

    async def _call(self, method: str, request: object) -> Any:
        try:
            return await getattr(self._stub, method)(request, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(
                    "the cache service (API keys) is unavailable, so keys cannot be checked; "
                    "retry shortly"
                ) from None
            raise from_rpc_error(exc) from None
