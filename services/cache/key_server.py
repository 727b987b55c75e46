"""The fmserve.v1.KeyStore servicer: wire → KeyRecords → wire. A record travels as the
StoredKey the gateway built (its info and a salted hash); only the revoked flag is the store's."""

from __future__ import annotations

import grpc

from fmserve.errors import InvalidInput
from fmserve.rpc.service import Servicer
from fmserve.v1 import keys_pb2, keys_pb2_grpc
from services.cache.keys import KeyRecord, KeyRecords


class KeyStoreServicer(keys_pb2_grpc.KeyStoreServicer):
    def __init__(self, keys: KeyRecords) -> None:
        self.keys = keys

    async def CreateKey(
        self, request: keys_pb2.StoredKey, context: grpc.aio.ServicerContext
    ) -> keys_pb2.StoredKey:
        info = request.info
        if not (info.key_id and info.name and request.salt and request.hash):
            raise InvalidInput("a stored key needs a key_id, a name, a salt and a hash")
        record = request.SerializeToString()
        await self.keys.create(info.key_id, info.name, info.created_unix_ms, record)
        return request

    async def GetKey(
        self, request: keys_pb2.GetKeyRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.StoredKey:
        return to_wire(await self.keys.get(request.key_id))

    async def ListKeys(
        self, request: keys_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.ListStoredKeysResponse:
        return keys_pb2.ListStoredKeysResponse(keys=[to_wire(r) for r in await self.keys.list()])

    async def RevokeKey(
        self, request: keys_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.StoredKey:
        return to_wire(await self.keys.get(await self.keys.revoke(request.name)))


def to_wire(record: KeyRecord) -> keys_pb2.StoredKey:
    stored = keys_pb2.StoredKey.FromString(record.record)
    stored.info.revoked = record.revoked
    return stored


def servicer(keys: KeyRecords) -> Servicer:
    """The servicer as `fmserve.rpc.service.Service` registers it."""
    name = keys_pb2.DESCRIPTOR.services_by_name["KeyStore"].full_name
    return Servicer(keys_pb2_grpc.add_KeyStoreServicer_to_server, KeyStoreServicer(keys), name)
