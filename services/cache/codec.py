"""The cache service's wire ↔ domain conversions for cached results, named for their direction
as in every service. Results pass through the cache as their serialized bytes, stored unmarked; a
result read back is marked `cached`. Job records convert in job_codec.py."""

from __future__ import annotations

import logging

from google.protobuf.message import DecodeError

from fmserve.v1 import cache_pb2, common_pb2

log = logging.getLogger("fmserve.cache")


def store_item_to_domain(item: cache_pb2.StoreItem) -> tuple[str, bytes]:
    """A key and its result's bytes, without the `cached` mark (Lookup sets it on the way out).
    An item without a result serializes to no bytes, which the cache refuses."""
    result = common_pb2.Result()
    result.CopyFrom(item.result)
    result.cached = False
    return item.key, result.SerializeToString()


def cache_entry_to_wire(value: bytes | None) -> cache_pb2.CacheEntry:
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
