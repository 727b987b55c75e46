"""API keys, scopes, the access table, the keyring's cache and the audit record, in memory."""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

import pytest

from fmserve.core import apikeys
from fmserve.core.logs import JsonFormatter
from fmserve.errors import InvalidInput, NotFound, PermissionDenied, Unauthenticated
from fmserve.v1 import common_pb2, gateway_pb2, jobs_pb2, keys_pb2
from services.gateway import audit, scopes
from services.gateway.access import AccessTable
from services.gateway.keyring import KeyRing

# --- keys ---------------------------------------------------------------------------------------


def test_a_key_has_its_format_and_verifies_only_against_its_own_hash() -> None:
    new = apikeys.generate()
    prefix, key_id, secret = new.api_key.split("_", 2)
    assert prefix == "fms" and key_id == new.key_id and len(secret) >= 43
    assert apikeys.key_id_of(new.api_key) == new.key_id
    assert new.api_key.encode() not in new.digest and len(new.salt) == 16
    assert apikeys.verify(new.api_key, new.salt, new.digest)
    wrong_secret = f"fms_{key_id}_{'x' * len(secret)}"
    assert not apikeys.verify(wrong_secret, new.salt, new.digest)
    assert not apikeys.verify(new.api_key, apikeys.generate().salt, new.digest)


def test_two_keys_never_share_an_id_salt_or_secret() -> None:
    a, b = apikeys.generate(), apikeys.generate()
    assert len({a.key_id, b.key_id}) == 2 and a.salt != b.salt and a.api_key != b.api_key


@pytest.mark.parametrize(
    "text", ["", "Bearer x", "fms_short_" + "s" * 40, "sk_0123456789abcdef_" + "s" * 40, "fms_"]
)
def test_what_is_not_shaped_like_a_key_claims_no_id(text: str) -> None:
    assert apikeys.key_id_of(text) is None


def test_verification_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(apikeys.hmac, "compare_digest", spy)
    new = apikeys.generate()
    assert apikeys.verify(new.api_key, new.salt, new.digest)
    assert calls == [(new.digest, new.digest)]


# --- scopes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("granted", "needed", "allowed"),
    [
        (["admin"], "infer:anything:embedding", True),
        (["admin"], "jobs:submit", True),
        (["admin"], "admin", True),
        (["infer:minilm-*"], "infer:minilm-embed:embedding", True),
        (["infer:minilm-*"], "infer:minilm-sentiment:text-classification", True),
        (["infer:minilm-*"], "infer:bert-base:embedding", False),
        (["infer:minilm-*:embedding"], "infer:minilm-embed:embedding", True),
        (["infer:minilm-*:embedding"], "infer:minilm-sentiment:text-classification", False),
        (["infer:*:embedding"], "infer:anything:embedding", True),
        (["infer:minilm-embed"], "infer:minilm-embed2:embedding", False),
        (["infer:minilm-?mbed"], "infer:minilm-embed:embedding", True),
        (["infer:MiniLM-*"], "infer:minilm-embed:embedding", False),  # case-sensitive
        (["infer:minilm-*:embedding"], "infer:minilm-x:", False),  # task unknown: any task only
        (["infer:minilm-*"], "infer:minilm-x:", True),
        (["infer:minilm-*"], "infer", True),  # ListModels: any infer scope
        (["jobs:read"], "infer", False),
        (["jobs:read"], "jobs:submit", False),
        (["jobs:submit"], "jobs:read", False),
        (["jobs:read", "jobs:submit"], "jobs:submit", True),
        (["infer:*"], "admin", False),
        (["infer:*"], "jobs:read", False),
        ([], "infer", False),
    ],
)
def test_scope_matching(granted: list[str], needed: str, allowed: bool) -> None:
    assert scopes.allows(granted, needed) is allowed


@pytest.mark.parametrize(
    "scope", ["admin", "jobs:submit", "jobs:read", "infer:*", "infer:minilm-*:embedding"]
)
def test_valid_scopes(scope: str) -> None:
    assert scopes.validate(scope) == scope


@pytest.mark.parametrize(
    "scope", ["", "root", "jobs:*", "infer:", "infer:a:b:c", "infer:a b", "embedding:x", "ADMIN"]
)
def test_invalid_scopes_are_refused_saying_the_grammar(scope: str) -> None:
    with pytest.raises(InvalidInput, match="infer:<model-glob>"):
        scopes.validate(scope)


# --- the access table ---------------------------------------------------------------------------

TABLE = AccessTable(
    lambda model: {"minilm-embed": "embedding"}.get(model, ""),
    lambda model: {"smollm2": (256, 1024)}.get(model, (0, 0)),
)


def test_every_gateway_method_has_an_access_rule() -> None:
    methods = set(gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].methods_by_name)
    assert methods == set(TABLE.rules)


def test_a_method_without_a_rule_is_refused() -> None:
    with pytest.raises(PermissionDenied, match="NewRpc has no access rule"):
        TABLE.access("NewRpc", object())


def test_infer_needs_the_model_and_its_own_task_when_none_is_asked() -> None:
    request = gateway_pb2.InferRequest(model="minilm-embed", texts=["a", "b"])
    access = TABLE.access("Infer", request)
    assert access.scopes == ("infer:minilm-embed:embedding",)
    assert (access.model, access.items) == ("minilm-embed", 2)
    request.task = common_pb2.TASK_TEXT_CLASSIFICATION
    assert TABLE.access("Infer", request).scopes == ("infer:minilm-embed:text-classification",)


def test_each_image_counts_against_the_keys_limits_as_a_text_does() -> None:
    image = common_pb2.Media(mime_type="image/png", data=b"\x89PNG")
    request = gateway_pb2.InferRequest(model="vit", media=[image] * 3)
    assert TABLE.access("Infer", request).items == 3


def generate(model: str, **parameters: int) -> gateway_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParameters(**parameters)
    return gateway_pb2.GenerateRequest(model=model, prompt="Hi", parameters=sampling)


def test_generate_needs_the_model_for_text_generation_and_reserves_its_tokens() -> None:
    access = TABLE.access("Generate", generate("smollm2", max_new_tokens=40))
    assert access.scopes == ("infer:smollm2:text-generation",)
    assert (access.model, access.items, access.metered) == ("smollm2", 40, True)
    assert access.asked == {"model": "smollm2", "tokens": 40}


def test_a_generation_reserves_the_model_default_when_unasked_and_never_over_its_cap() -> None:
    assert TABLE.access("Generate", generate("smollm2")).items == 256
    assert TABLE.access("Generate", generate("smollm2", max_new_tokens=5000)).items == 1024
    assert TABLE.access("Generate", generate("unknown")).items == 0  # refused NOT_FOUND anyway


def test_a_generation_job_reserves_max_new_tokens_per_item() -> None:
    assert TABLE.generation_tokens("smollm2", 32, items=10) == 320
    assert TABLE.generation_tokens("smollm2", 0, items=10) == 2560
    sampling = common_pb2.SamplingParameters(max_new_tokens=32)
    header = gateway_pb2.JobHeader(
        model="smollm2", task=common_pb2.TASK_TEXT_GENERATION, expected_items=10,
        parameters=sampling,
    )  # fmt: skip
    access = TABLE.access("SubmitJob", gateway_pb2.SubmitJobRequest(header=header))
    assert access.scopes == ("jobs:submit", "infer:smollm2:text-generation")
    assert (access.items, access.metered) == (320, False)  # charged once, never settled


def test_submit_job_is_checked_on_its_header() -> None:
    header = gateway_pb2.JobHeader(model="minilm-embed", expected_items=7)
    access = TABLE.access("SubmitJob", gateway_pb2.SubmitJobRequest(header=header))
    assert access.scopes == ("jobs:submit", "infer:minilm-embed:embedding")
    assert (access.model, access.items, access.counted) == ("minilm-embed", 7, True)
    undeclared = gateway_pb2.JobHeader(model="minilm-embed")
    assert not TABLE.access("SubmitJob", gateway_pb2.SubmitJobRequest(header=undeclared)).counted
    items_first = gateway_pb2.SubmitJobRequest(items=gateway_pb2.JobItems(texts=["a"]))
    assert not scopes.allows(
        ["jobs:submit", "infer:minilm-*"], TABLE.access("SubmitJob", items_first).scopes[1]
    )


@pytest.mark.parametrize(
    ("method", "request_", "needed"),
    [
        ("GetJob", jobs_pb2.GetJobRequest(job_id="j"), "jobs:read"),
        ("WatchJob", jobs_pb2.GetJobRequest(job_id="j"), "jobs:read"),
        ("GetJobResults", jobs_pb2.GetJobResultsRequest(job_id="j"), "jobs:read"),
        ("ListJobs", jobs_pb2.ListJobsRequest(), "jobs:read"),
        ("CancelJob", jobs_pb2.CancelJobRequest(job_id="j"), "jobs:submit"),
        ("ListModels", gateway_pb2.ListModelsRequest(), "infer"),
        ("CreateApiKey", keys_pb2.CreateApiKeyRequest(name="ci"), "admin"),
        ("ListApiKeys", keys_pb2.ListApiKeysRequest(), "admin"),
        ("RevokeApiKey", keys_pb2.RevokeApiKeyRequest(name="ci"), "admin"),
    ],
)
def test_what_each_other_method_needs(method: str, request_: Any, needed: str) -> None:
    assert TABLE.access(method, request_).scopes == (needed,)


# --- the keyring --------------------------------------------------------------------------------


class MemoryKeyStore:
    """The cache service's KeyStore, in memory, counting reads."""

    def __init__(self) -> None:
        self.keys: dict[str, keys_pb2.StoredKey] = {}
        self.reads = 0

    def add(self, name: str, scopes_: list[str], expires_ms: int = 0) -> str:
        new = apikeys.generate()
        info = keys_pb2.ApiKeyInfo(
            key_id=new.key_id, name=name, scopes=scopes_, expires_unix_ms=expires_ms, rpm=60
        )
        self.keys[new.key_id] = keys_pb2.StoredKey(info=info, salt=new.salt, hash=new.digest)
        return new.api_key

    async def get(self, key_id: str) -> keys_pb2.StoredKey:
        self.reads += 1
        if key_id not in self.keys:
            raise NotFound("no such API key")
        return self.keys[key_id]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def keyring(store: MemoryKeyStore, clock: Clock, admin_key: str = "") -> KeyRing:
    return KeyRing(store, 0.5, admin_key, clock=clock)  # type: ignore[arg-type]


async def test_a_valid_key_is_its_principal() -> None:
    store = MemoryKeyStore()
    key = store.add("ci", ["infer:minilm-*", "jobs:submit"])
    principal = await keyring(store, Clock()).authenticate(key)
    assert principal.name == "ci" and principal.scopes == ("infer:minilm-*", "jobs:submit")
    assert (
        principal.key_id == apikeys.key_id_of(key) and not principal.admin and principal.rpm == 60
    )


@pytest.mark.parametrize(
    "shape", ["missing", "malformed", "unknown id", "wrong secret", "too long"]
)
async def test_a_missing_or_wrong_key_is_unauthenticated(shape: str) -> None:
    store = MemoryKeyStore()
    key = store.add("ci", ["jobs:read"])
    key_id = apikeys.key_id_of(key)
    presented = {
        "missing": "",
        "malformed": "not-a-key",
        "unknown id": f"fms_{'0' * 16}_{'s' * 43}",
        "wrong secret": f"fms_{key_id}_{'s' * 43}",
        "too long": key + "s" * 1000,
    }[shape]
    with pytest.raises(Unauthenticated) as raised:
        await keyring(store, Clock()).authenticate(presented)
    assert "s" * 43 not in raised.value.message


async def test_a_revoked_key_stops_working_once_the_cache_interval_passes() -> None:
    store, clock = MemoryKeyStore(), Clock()
    key = store.add("ci", ["jobs:read"])
    ring = keyring(store, clock)
    for _ in range(5):
        await ring.authenticate(key)
    assert store.reads == 1  # cached: one lookup for five calls
    store.keys[apikeys.key_id_of(key) or ""].info.revoked = True
    clock.now = 0.4
    await ring.authenticate(key)  # still trusted within the interval
    clock.now = 0.6
    with pytest.raises(Unauthenticated):
        await ring.authenticate(key)
    assert store.reads == 2


async def test_an_expired_key_is_refused_even_while_cached() -> None:
    store = MemoryKeyStore()
    expired = store.add("old", ["jobs:read"], expires_ms=int(time.time() * 1000) - 1)
    with pytest.raises(Unauthenticated):
        await keyring(store, Clock()).authenticate(expired)


async def test_a_key_verified_lately_is_known_at_once_until_its_interval_passes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, clock = MemoryKeyStore(), Clock()
    expires_ms = int(time.time() * 1000) + 60_000
    key = store.add("ci", ["jobs:read"], expires_ms=expires_ms)
    ring = keyring(store, clock)
    assert ring.known(key) is None and store.reads == 0  # not verified yet: authenticate asks
    await ring.authenticate(key)
    known = ring.known(key)
    assert known is not None and known.name == "ci" and store.reads == 1
    clock.now = 0.6
    assert ring.known(key) is None  # its interval passed: to be verified again
    clock.now = 0.4
    monkeypatch.setattr(time, "time", lambda: expires_ms / 1000 + 1)
    with pytest.raises(Unauthenticated):
        ring.known(key)  # expired while still cached


async def test_the_configured_admin_key_works_without_the_store() -> None:
    store = MemoryKeyStore()
    admin_key = apikeys.generate().api_key
    ring = keyring(store, Clock(), admin_key)
    principal = await ring.authenticate(admin_key)
    assert principal.admin and principal.scopes == ("admin",) and store.reads == 0
    assert ring.known(admin_key) == principal
    forged = admin_key[:-4] + "AAAA" if not admin_key.endswith("AAAA") else admin_key[:-4] + "BBBB"
    with pytest.raises(Unauthenticated):
        await ring.authenticate(forged)


# --- the audit record ---------------------------------------------------------------------------


def test_an_audit_record_is_one_json_line_saying_who_what_when_and_outcome(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="fmserve.audit"):
        audit.record("Infer", "PERMISSION_DENIED", "0123456789abcdef", "ci", {"model": "m"})
    line = JsonFormatter("gateway").format(caplog.records[-1])
    assert "\n" not in line
    event = json.loads(line)
    assert event["logger"] == "fmserve.audit" and event["level"] == "warning"
    assert event["method"] == "Infer" and event["outcome"] == "PERMISSION_DENIED"
    assert (event["key_id"], event["key_name"]) == ("0123456789abcdef", "ci")
    assert event["asked"] == {"model": "m"}
    assert abs(event["unix_ms"] - time.time() * 1000) < 5000 and event["ts"].endswith("Z")
