"""Auth end to end: the five services as processes with FMSERVE_AUTH on, TLS at the gateway
and mTLS between the services (as a deployment runs them), and two gateway replicas: every
public RPC refused without a key and without its scope (walked through server reflection),
scoped keys, revocation on every replica within a second, job ownership, the CLI's `keys`
commands, the audit trail, and no key (API or private) in any log line the cluster wrote."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from fmserve import AsyncClient, Client
from fmserve.cli.certs import generate
from fmserve.cli.cluster import SERVICES, Cluster, free_port
from fmserve.core import apikeys
from fmserve.errors import (
    InvalidInput,
    JobNotFound,
    PermissionDenied,
    TooLarge,
    Unauthenticated,
)
from fmserve.queue.topology import delete_queues
from tests.conftest import AMQP_URL, REDIS_URL, require_server
from tests.e2e.conftest import REDIS_DB, forget_keys, topology

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

ADMIN_KEY = apikeys.generate().api_key
SECRETS: list[str] = [ADMIN_KEY]
"""Every key this module sees; none may appear in any log line (the last test)."""


Connect = Callable[..., Client]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("certs")).folder


@pytest.fixture(scope="module")
def ca(certs: Path) -> bytes:
    return (certs / "ca.crt").read_bytes()


@pytest.fixture(scope="module")
def connect(ca: bytes) -> Connect:
    """A client of a gateway over TLS, with an API key or none."""

    def client(address: str, key: str = "") -> Client:
        return Client(address, root_certificates=ca, api_key=key)

    return client


@pytest.fixture(scope="module")
def secure_cluster(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory, certs: Path
) -> Iterator[Cluster]:
    require_server("Redis", "127.0.0.1", 6379)
    require_server("RabbitMQ", "127.0.0.1", 5672)
    prefix = f"fmserve-auth-{uuid.uuid4().hex[:8]}:"
    env = {
        "FMSERVE_AUTH": "on",
        "FMSERVE_ADMIN_KEY": ADMIN_KEY,
        "FMSERVE_AMQP_URL": AMQP_URL,
        "FMSERVE_AMQP_QUEUE_PREFIX": prefix.replace(":", "."),
        "FMSERVE_AMQP_DELIVERY_LIMIT": "3",
        "FMSERVE_MODEL_REPOSITORY": str(model_repository),
        "FMSERVE_REDIS_URL": f"{REDIS_URL}/{REDIS_DB}",
        "FMSERVE_CACHE_KEY_PREFIX": prefix,
        "FMSERVE_INFERENCE_PRELOAD": "minilm-embed",
        "FMSERVE_PREPROCESS_PRELOAD": "minilm-embed",
        "FMSERVE_INFERENCE_TORCH_THREADS": "1",
        "FMSERVE_LOG_LEVEL": "DEBUG",  # the most lines in which a key could leak
    }
    ports = {name: free_port() for name in SERVICES}
    cluster = Cluster(
        env=env,
        ports=ports,
        replicas={"gateway": 2},
        log_dir=tmp_path_factory.mktemp("auth-logs"),
        say=lambda _: None,
        certs=certs,
    )
    try:
        cluster.start(timeout_s=180)
        yield cluster
    finally:
        cluster.stop(grace_s=5)
        forget_keys(prefix)
        with ThreadPoolExecutor(1) as thread:
            thread.submit(asyncio.run, delete_queues(AMQP_URL, topology(prefix))).result()


@pytest.fixture(scope="module")
def gateways(secure_cluster: Cluster) -> list[str]:
    return [r.address for r in secure_cluster.replicas_of["gateway"]]


@pytest.fixture(scope="module")
def admin(gateways: list[str], connect: Connect) -> Iterator[Client]:
    with connect(gateways[0], ADMIN_KEY) as client:
        yield client


def new_key(admin: Client, scopes: list[str], name: str = "") -> str:
    created = admin.create_api_key(name or f"k-{uuid.uuid4().hex[:8]}", scopes)
    SECRETS.append(created.api_key)
    return created.api_key


def call(channel: grpc.Channel, method: Any, key: str = "") -> grpc.StatusCode:
    """Call a method with an empty request (its header, for a client stream) and one key."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    kind = (
        ("unary" if not method.client_streaming else "stream")
        + "_"
        + ("stream" if method.server_streaming else "unary")
    )
    stub = getattr(channel, kind)(path, request_serializer=None, response_deserializer=None)
    request: Any = b"" if not method.client_streaming else iter([b""])
    try:
        reply = stub(request, metadata=metadata, timeout=10)
        if method.server_streaming:
            list(reply)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_every_gateway_rpc_found_by_reflection_is_refused_without_a_key_or_its_scope(
    gateways: list[str], admin: Client, ca: bytes
) -> None:
    jobs_only, infer_only = new_key(admin, ["jobs:read"]), new_key(admin, ["infer:*"])
    with grpc.secure_channel(gateways[0], grpc.ssl_channel_credentials(ca)) as channel:
        # Reflection and health answer without a key.
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName("fmserve.v1.Gateway")
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        methods = list(service.methods)
        assert len(methods) >= 11 and {"Infer", "SubmitJob", "CreateApiKey"} <= {
            m.name for m in methods
        }
        for method in methods:
            assert call(channel, method) == grpc.StatusCode.UNAUTHENTICATED, method.name
            assert call(channel, method, "fms_" + "0" * 16 + "_" + "x" * 43) == (
                grpc.StatusCode.UNAUTHENTICATED
            ), method.name
            codes = {call(channel, method, jobs_only), call(channel, method, infer_only)}
            assert grpc.StatusCode.PERMISSION_DENIED in codes, method.name
            assert grpc.StatusCode.UNAUTHENTICATED not in codes, method.name


def test_a_scoped_key_calls_its_models_only_and_is_told_the_scope_it_lacks(
    gateways: list[str], admin: Client, connect: Connect
) -> None:
    key = new_key(admin, ["infer:minilm-embed:embedding"])
    with connect(gateways[1], key) as client:
        assert client.embed(["a sentence"]).shape == (1, 384)
        assert [m.name for m in client.models()] == ["minilm-embed"]  # only what it may call
    assert {"minilm-embed", "minilm-sentiment"} <= {m.name for m in admin.models()}
    with connect(gateways[1], key) as client:
        with pytest.raises(PermissionDenied, match="infer:minilm-sentiment:text-classification"):
            client.classify(["I love it"], model="minilm-sentiment")
        with pytest.raises(PermissionDenied, match="jobs:submit"):
            client.submit(["a"], "minilm-embed")
    with connect(gateways[1]) as anonymous, pytest.raises(Unauthenticated, match="Bearer"):
        anonymous.embed(["a sentence"])


async def test_both_clients_take_their_key_from_fmserve_api_key_unless_given_one(
    gateways: list[str], admin: Client, ca: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FMSERVE_API_KEY", new_key(admin, ["infer:minilm-embed:embedding"]))
    with Client(gateways[0], root_certificates=ca) as client:
        assert [m.name for m in client.models()] == ["minilm-embed"]
    async with AsyncClient(gateways[1], root_certificates=ca) as aio:
        assert [m.name for m in await aio.models()] == ["minilm-embed"]
    # A key given (even an empty one: none) wins over the environment.
    with Client(gateways[0], root_certificates=ca, api_key=ADMIN_KEY) as client:
        assert {"minilm-embed", "minilm-sentiment"} <= {m.name for m in client.models()}
    async with AsyncClient(gateways[1], root_certificates=ca, api_key="") as aio:
        with pytest.raises(Unauthenticated, match="Bearer"):
            await aio.models()


def test_a_revoked_key_is_refused_by_every_replica_within_a_second(
    gateways: list[str], admin: Client, connect: Connect
) -> None:
    name = f"revoked-{uuid.uuid4().hex[:6]}"
    key = new_key(admin, ["infer:minilm-*"], name)
    clients = [connect(address, key) for address in gateways]
    try:
        for client in clients:  # both replicas have verified (and cached) the key
            client.embed(["warm"], cache="bypass")
        admin.revoke_api_key(name)
        revoked_at = time.monotonic()
        refused_after = [wait_refused(client) - revoked_at for client in clients]
    finally:
        for client in clients:
            client.close()
    assert max(refused_after) < 1.0, refused_after
    assert [k.revoked for k in admin.api_keys() if k.name == name] == [True]


def test_the_edge_limits_hold_for_an_authorized_key(
    gateways: list[str], admin: Client, connect: Connect, ca: bytes
) -> None:
    """Input hygiene under auth: a key with every scope still meets the gateway's bounds."""
    key = new_key(admin, ["infer:*"])
    with connect(gateways[0], key) as client:
        with pytest.raises(TooLarge, match="1024"):
            client.embed(["a text"] * 1025)  # FMSERVE_GATEWAY_MAX_ITEMS
        with pytest.raises(InvalidInput):
            client.embed([""])
        assert client.embed(["still served"]).shape == (1, 384)
    with grpc.secure_channel(gateways[0], grpc.ssl_channel_credentials(ca)) as channel:
        infer = channel.unary_unary("/fmserve.v1.Gateway/ListModels")
        big = (("authorization", f"Bearer {key}"), ("x-padding", "a" * 9000))
        with pytest.raises(grpc.RpcError) as refused:
            infer(b"", metadata=big, timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # 8 KiB of metadata


def wait_refused(client: Client) -> float:
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            client.models()
        except Unauthenticated:
            return time.monotonic()
        time.sleep(0.02)
    raise AssertionError("the revoked key still works after 3 s")


def test_a_job_is_seen_only_by_the_key_that_submitted_it_and_admins(
    gateways: list[str], admin: Client, connect: Connect
) -> None:
    scopes = ["infer:minilm-*", "jobs:submit", "jobs:read"]
    owner_key, other_key = new_key(admin, scopes), new_key(admin, scopes)
    with (
        connect(gateways[0], owner_key) as owner,
        connect(gateways[1], other_key) as other,
    ):
        job = owner.submit(["one", "two"], "minilm-embed", idempotency_key="same")
        assert job.wait(timeout=60).state == "succeeded"
        unknown = "0" * 32
        for ask in (
            lambda c, i: c.job(i).status(),
            lambda c, i: list(c.job(i).results()),
            lambda c, i: c.job(i).wait(timeout=10),
            lambda c, i: c.job(i).cancel(),
        ):
            with pytest.raises(JobNotFound) as theirs:
                ask(other, job.id)
            with pytest.raises(JobNotFound) as nobodys:
                ask(other, unknown)
            assert theirs.value.message == nobodys.value.message.replace(unknown, job.id)
        assert [j.id for j in owner.jobs()] == [job.id]
        assert job.id not in [j.id for j in other.jobs()]
        # An idempotency key is the submitting key's own: the same one gives another its own job.
        assert other.submit(["x"], "minilm-embed", idempotency_key="same").id != job.id
        assert owner.submit(["y"], "minilm-embed", idempotency_key="same").id == job.id
    assert job.id in [j.id for j in admin.jobs(limit=100)]
    assert admin.job(job.id).status().state == "succeeded"


def fmserve(address: str, key: str, certs: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FMSERVE_API_KEY": key, "FMSERVE_CERTS": str(certs)}
    return subprocess.run(
        [sys.executable, "-m", "fmserve.cli", "--address", address, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_cli_creates_lists_and_revokes_keys(
    gateways: list[str], certs: Path, connect: Connect
) -> None:
    name = f"ci-{uuid.uuid4().hex[:6]}"
    created = fmserve(
        gateways[0], ADMIN_KEY, certs, "keys", "create", "--name", name,
        "--scopes", "infer:minilm-*,jobs:submit", "--rpm", "600", "--concurrency", "4",
        "--daily-items", "1000", "--expires-in", "30d",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    SECRETS.append(key)
    assert apikeys.key_id_of(key) is not None
    with connect(gateways[1], key) as client:
        assert client.embed(["via the cli's key"]).shape == (1, 384)
    listed = fmserve(gateways[1], ADMIN_KEY, certs, "keys", "list", "--json")
    mine = [json.loads(line) for line in listed.stdout.splitlines() if f'"{name}"' in line]
    assert len(mine) == 1 and mine[0]["scopes"] == ["infer:minilm-*", "jobs:submit"]
    assert (mine[0]["rpm"], mine[0]["max_concurrency"], mine[0]["daily_items"]) == (600, 4, 1000)
    assert 29 * 86400 < mine[0]["expires"] - time.time() <= 30 * 86400
    assert key not in listed.stdout
    revoked = fmserve(gateways[0], ADMIN_KEY, certs, "keys", "revoke", name)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    refused = fmserve(gateways[0], key, certs, "keys", "list")
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    not_admin = fmserve(gateways[0], "", certs, "models")
    assert not_admin.returncode == 1 and "UNAUTHENTICATED" in not_admin.stderr


# Every CLI command that calls the gateway, with arguments that reach it. Each must connect with
# the CLI's TLS settings and send FMSERVE_API_KEY: a key without any scope is then told, by
# name, which scope it lacks (PERMISSION_DENIED); a command that forgot the key would be
# UNAUTHENTICATED, one that forgot TLS UNAVAILABLE.
GATEWAY_COMMANDS = [
    ["embed", "--model", "minilm-embed", "a text"],
    ["classify", "--model", "minilm-sentiment", "a text"],
    ["entities", "--model", "minilm-embed", "a text"],
    ["generate", "--model", "minilm-embed", "a prompt"],
    ["submit", "--model", "minilm-embed", "--input", "{jobs}"],
    ["job", "0" * 32],
    ["jobs"],
    ["cancel", "0" * 32],
    ["keys", "list"],
]


@pytest.mark.parametrize("command", GATEWAY_COMMANDS, ids=lambda c: c[0])
def test_every_cli_command_sends_the_key_over_tls(
    gateways: list[str], admin: Client, certs: Path, tmp_path: Path, command: list[str]
) -> None:
    name = f"scopeless-{uuid.uuid4().hex[:6]}"
    key = new_key(admin, ["infer:no-such-model"], name)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"text": "a"}\n')
    done = fmserve(gateways[0], key, certs, *[part.format(jobs=jobs) for part in command])
    assert done.returncode == 1, done.stdout
    assert "PERMISSION_DENIED" in done.stderr and name in done.stderr, done.stderr


def test_refusals_and_admin_actions_are_audited(secure_cluster: Cluster) -> None:
    events = [e for e in log_events(secure_cluster) if e.get("logger") == "fmserve.audit"]
    outcomes = {(e["method"], e["outcome"]) for e in events}
    assert ("CreateApiKey", "OK") in outcomes and ("RevokeApiKey", "OK") in outcomes
    assert ("Infer", "UNAUTHENTICATED") in outcomes
    assert ("Infer", "PERMISSION_DENIED") in outcomes
    denied = next(
        e for e in events if e["outcome"] == "PERMISSION_DENIED" and e["method"] == "Infer"
    )
    assert denied["key_name"] and len(denied["key_id"]) == 16 and "unix_ms" in denied


def test_no_key_appears_in_any_log_line(secure_cluster: Cluster, certs: Path) -> None:
    """Last: every key this module used (the admin key included), and the services' private
    keys, against every line written."""
    lines = [
        line
        for path in secure_cluster.log_dir.glob("*.log")
        for line in path.read_text(errors="replace").splitlines()
    ]
    assert len(lines) > 100 and len(SECRETS) >= 8
    secrets = [key.split("_", 2)[2] for key in SECRETS]  # the secret part alone, too
    secrets += [  # each private key's base64 lines
        line
        for path in certs.glob("*.key")
        for line in path.read_text().splitlines()
        if not line.startswith("-----")
    ]
    leaked = [line for line in lines if any(s in line for s in secrets)]
    assert leaked == []


def log_events(cluster: Cluster) -> list[dict[str, Any]]:
    events = []
    for path in cluster.log_dir.glob("gateway*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                events.append(json.loads(line))
    return events
