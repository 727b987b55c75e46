"""The cache service's pure parts: settings, request rules, wire conversion, and how Redis
failures are described (without Redis; the integration tests cover the real thing)."""

from __future__ import annotations

import pytest
from redis import exceptions as rx

from fmserve.errors import InvalidInput
from fmserve.v1 import cache_pb2, common_pb2
from services.cache.cache import check_keys, check_ttl, check_values
from services.cache.codec import cache_entry_to_wire, store_item_to_domain
from services.cache.settings import CacheSettings
from services.cache.store import describe, redis_address

RESULT = common_pb2.Result(embedding=common_pb2.Embedding(values=[1.0, 0.5]))


def test_settings_read_the_cluster_redis_url_and_their_own_prefix(monkeypatch):
    monkeypatch.setenv("FMSERVE_REDIS_URL", "redis://u:s3cret@redis:6380/2")
    monkeypatch.setenv("FMSERVE_CACHE_KEY_PREFIX", "blue:")
    settings = CacheSettings()
    assert settings.redis_url.get_secret_value() == "redis://u:s3cret@redis:6380/2"
    assert settings.key_prefix == "blue:"
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in str(settings.model_dump(mode="json"))


def test_settings_defaults(monkeypatch):
    monkeypatch.delenv("FMSERVE_REDIS_URL", raising=False)
    settings = CacheSettings()
    assert settings.port == 50055
    assert settings.redis_url.get_secret_value() == "redis://127.0.0.1:6379/0"
    assert (settings.key_prefix, settings.default_ttl_s) == ("fmserve:", 3600)
    assert (settings.socket_timeout_s, settings.max_connections) == (1.0, 64)


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis://user:s3cret@cache.internal:6380/3", "cache.internal:6380"),
        ("rediss://:s3cret@10.0.0.5", "10.0.0.5:6379"),
        ("redis://[::1]:7000/0", "[::1]:7000"),
        ("unix:///run/redis.sock?db=2", "/run/redis.sock"),
    ],
)
def test_redis_address_never_shows_credentials(url, address):
    assert redis_address(url) == address


@pytest.mark.parametrize(
    ("exc", "reason", "needle"),
    [
        (rx.ConnectionError("Error 111"), "unreachable", "Redis is unreachable at h:1"),
        (ConnectionRefusedError(), "unreachable", "Redis is unreachable at h:1"),
        (rx.TimeoutError("Timeout reading"), "timeout", "did not answer within 1 s"),
        (rx.AuthenticationError("invalid password"), "refused", "refused the credentials"),
        (rx.OutOfMemoryError("OOM"), "refused", "out of memory"),
        (rx.ReadOnlyError("READONLY"), "refused", "refused the command (ReadOnlyError)"),
    ],
)
def test_redis_failures_are_described_for_people(exc, reason, needle):
    got_reason, message = describe(exc, "h:1", CacheSettings())
    assert got_reason == reason
    assert needle in message


def test_an_exhausted_pool_is_busy_not_unreachable():
    try:
        raise rx.ConnectionError("No connection available.") from TimeoutError()
    except rx.ConnectionError as exc:
        reason, message = describe(exc, "h:1", CacheSettings(max_connections=8))
    assert reason == "busy"
    assert "all 8 connections" in message


def test_keys_are_limited_in_bytes():
    check_keys(["k" * 512, "é" * 256])
    with pytest.raises(InvalidInput, match="cache key 1 is 514 bytes"):
        check_keys(["ok", "é" * 257])
    with pytest.raises(InvalidInput, match="cache key 0 is empty"):
        check_keys([""])


def test_ttl_and_values():
    check_ttl(0)
    with pytest.raises(InvalidInput, match="ttl_s is -5"):
        check_ttl(-5)
    with pytest.raises(InvalidInput, match="item 1 has no result"):
        check_values([("a", b"x"), ("b", b"")])


def test_results_are_stored_unmarked_and_read_back_marked():
    marked = common_pb2.Result()
    marked.CopyFrom(RESULT)
    marked.cached = True
    key, value = store_item_to_domain(cache_pb2.StoreItem(key="k", result=marked))
    assert (key, common_pb2.Result.FromString(value)) == ("k", RESULT)
    assert cache_entry_to_wire(value) == cache_pb2.CacheEntry(found=True, result=marked)
    assert store_item_to_domain(cache_pb2.StoreItem(key="k")) == ("k", b"")


def test_an_unreadable_value_is_a_miss():
    assert cache_entry_to_wire(None) == cache_pb2.CacheEntry(found=False)
    assert cache_entry_to_wire(b"\xff\xff\xff") == cache_pb2.CacheEntry(found=False)
