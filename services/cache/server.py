"""The fmserve.v1.Cache servicer: wire → ResultCache → wire. Results pass through the cache as
their serialized bytes, stored unmarked; a result read back is marked `cached`."""

from __future__ import annotations

import logging

import grpc
from google.protobuf.message import DecodeError

from fmserve.service import Servicer
from fmserve.v1 import cache_pb2, cache_pb2_grpc, common_pb2
from services.cache.cache import ResultCache

log = logging.getLogger("fmserve.cache")


class CacheServicer(cache_pb2_grpc.CacheServicer):
    def __init__(self, cache: ResultCache) -> None:
        self.cache = cache

    async def Lookup(
        self, request: cache_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.LookupResponse:
        values = await self.cache.lookup(list(request.keys))
        return cache_pb2.LookupResponse(entries=[to_wire(value) for value in values])

    async def Store(
        self, request: cache_pb2.StoreRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.StoreResponse:
        items = [to_domain(item) for item in request.items]
        stored = await self.cache.store(items, request.ttl_s)
        return cache_pb2.StoreResponse(stored=stored)


def servicer(cache: ResultCache) -> Servicer:
    name = cache_pb2.DESCRIPTOR.services_by_name["Cache"].full_name
    return Servicer(cache_pb2_grpc.add_CacheServicer_to_server, CacheServicer(cache), name)


def to_domain(item: cache_pb2.StoreItem) -> tuple[str, bytes]:
    """A key and its result's bytes, without the `cached` mark (Lookup sets it on the way out).
    An item without a result serializes to no bytes, which the cache refuses."""
    result = common_pb2.Result()
    result.CopyFrom(item.result)
    result.cached = False
    return item.key, result.SerializeToString()


def to_wire(value: bytes | None) -> cache_pb2.CacheEntry:
    """One entry of a Lookup reply. A value that does not parse (a foreign write, an old schema)
    is reported as a miss, so the gateway recomputes it and its Store overwrites it."""
    if value is None:
        return cache_pb2.CacheEntry(found=False)
    try:
        result = common_pb2.Result.FromString(value)
    except DecodeError:
        log.warning("unreadable cache entry reported as a miss")
        return cache_pb2.CacheEntry(found=False)
    result.cached = True
    return cache_pb2.CacheEntry(found=True, result=result)
