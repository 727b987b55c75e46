"""TLS at the gateway and mTLS between services, end to end: the five services as processes with
certificates from `fmserve certs` (generated for this module), the public client and CLI over
TLS, tritonclient over TLS, and every stage refusing, at the handshake, a client without a
certificate the cluster's CA signed."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fmserve import AsyncClient, Client
from fmserve.cli import main as cli
from fmserve.cli.certs import generate
from fmserve.cli.cluster import Cluster
from fmserve.errors import Unavailable
from fmserve.rpc import tls
from tests.e2e.conftest import cluster_env, running_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

STAGES = ("preprocess", "inference", "postprocess", "cache")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("certs")).folder


@pytest.fixture(scope="module")
def foreign_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates of another cluster: same names, another CA."""
    return generate(tmp_path_factory.mktemp("foreign-certs")).folder


@pytest.fixture(scope="module")
def secure_cluster(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory, certs: Path
) -> Iterator[Cluster]:
    prefix = f"fmserve-e2e-tls-{uuid.uuid4().hex[:8]}:"
    env = cluster_env(model_repository, prefix)
    with running_cluster(env, tmp_path_factory.mktemp("tls-logs"), prefix, certs) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def gateway(secure_cluster: Cluster) -> str:
    return secure_cluster.address("gateway")


def ca_of(folder: Path) -> bytes:
    return (folder / "ca.crt").read_bytes()


def health(address: str, credentials: grpc.ChannelCredentials | None) -> int:
    """The stage's health status; raises grpc.RpcError when the call cannot be made."""
    channel = (
        grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)


# The public client over TLS ------------------------------------------------------------------


def test_client_over_tls_infers_and_runs_a_job(gateway: str, certs: Path) -> None:
    with Client(gateway, root_certificates=ca_of(certs)) as client:
        vectors = client.embed(["over TLS", f"and mTLS inside {uuid.uuid4().hex}"])
        assert vectors.shape[0] == 2 and np.all(np.isfinite(vectors))
        # The job path: gateway → RabbitMQ → three stages, whose workers record items in the
        # cache service over mTLS.
        job = client.submit([f"job item {i} {uuid.uuid4().hex}" for i in range(5)], "minilm-embed")
        status = job.wait(timeout=90)
        assert (status.state, status.done, status.failed) == ("succeeded", 5, 0)
        items = list(job.results())
        assert [i.index for i in items] == list(range(5)) and all(i.ok for i in items)


async def test_async_client_over_tls(gateway: str, certs: Path) -> None:
    async with AsyncClient(gateway, root_certificates=ca_of(certs)) as client:
        vectors = await client.embed("the async twin, over TLS")
        assert vectors.shape == (1, 384)


def test_cli_trusts_the_ca_of_fmserve_certs(
    gateway: str, certs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FMSERVE_CERTS", str(certs))
    assert cli(["--address", gateway, "models"]) == 0
    assert "minilm-embed" in capsys.readouterr().out


def test_plaintext_client_is_refused_by_the_tls_gateway(gateway: str) -> None:
    with Client(gateway, timeout=5) as client, pytest.raises(Unavailable):
        client.models()


def test_system_roots_do_not_trust_a_private_ca(gateway: str) -> None:
    with Client(gateway, timeout=5, tls=True) as client, pytest.raises(Unavailable):
        client.models()


def test_cli_takes_a_ca_file(
    gateway: str, certs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("FMSERVE_CERTS", raising=False)
    monkeypatch.setenv("FMSERVE_TLS_CA", str(certs / "ca.crt"))
    assert cli(["--address", gateway, "embed", "a CA file is enough"]) == 0
    assert "384 dimensions" in capsys.readouterr().out
    monkeypatch.delenv("FMSERVE_TLS_CA")
    assert cli(["--address", gateway, "models"]) == 1  # plaintext to a TLS gateway
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_client_trusting_another_ca_refuses_the_gateway(gateway: str, foreign_certs: Path) -> None:
    foreign = Client(gateway, timeout=5, root_certificates=ca_of(foreign_certs))
    with foreign as client, pytest.raises(Unavailable):
        client.models()


# Stages: mTLS only ---------------------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
def test_stage_serves_a_client_with_the_clusters_certificate(
    secure_cluster: Cluster, certs: Path, stage: str
) -> None:
    identity = tls.from_folder(certs, "client")
    address = secure_cluster.address(stage)
    assert health(address, identity.channel_credentials()) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("stage", STAGES)
def test_stage_refuses_a_client_without_a_certificate(
    secure_cluster: Cluster, certs: Path, stage: str
) -> None:
    without = grpc.ssl_channel_credentials(root_certificates=ca_of(certs))
    with pytest.raises(grpc.RpcError) as refused:
        health(secure_cluster.address(stage), without)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("stage", STAGES)
def test_stage_refuses_a_certificate_from_another_ca(
    secure_cluster: Cluster, certs: Path, foreign_certs: Path, stage: str
) -> None:
    foreign = tls.from_folder(foreign_certs, "client")
    # The client trusts the cluster's CA (so only the server's check can fail) but presents a
    # certificate another CA signed.
    credentials = grpc.ssl_channel_credentials(ca_of(certs), foreign.key, foreign.cert)
    with pytest.raises(grpc.RpcError) as refused:
        health(secure_cluster.address(stage), credentials)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("stage", STAGES)
def test_stage_refuses_plaintext(secure_cluster: Cluster, stage: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        health(secure_cluster.address(stage), None)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


# tritonclient over TLS to the inference service ----------------------------------------------


def triton_tls(certs: Path, name: str = "client") -> dict[str, object]:
    return {
        "ssl": True,
        "root_certificates": str(certs / "ca.crt"),
        "private_key": str(certs / f"{name}.key"),
        "certificate_chain": str(certs / f"{name}.crt"),
    }


def embed_input(ids: list[int]) -> list[triton.InferInput]:
    """One text's token ids, ragged: the ids flat, and each text's length."""
    input_ids = triton.InferInput("input_ids", [len(ids)], "INT64")
    input_ids.set_data_from_numpy(np.array(ids, dtype=np.int64))
    lengths = triton.InferInput("lengths", [1], "INT32")
    lengths.set_data_from_numpy(np.array([len(ids)], dtype=np.int32))
    return [input_ids, lengths]


def test_tritonclient_over_tls(secure_cluster: Cluster, certs: Path) -> None:
    client = triton.InferenceServerClient(secure_cluster.address("inference"), **triton_tls(certs))
    try:
        assert client.is_server_ready() and client.is_model_ready("minilm-embed")
        result = client.infer("minilm-embed", embed_input([101, 7592, 102]))
        assert result.as_numpy("embeddings").shape == (1, 384)
    finally:
        client.close()


async def test_tritonclient_aio_over_tls(secure_cluster: Cluster, certs: Path) -> None:
    address = secure_cluster.address("inference")
    async with triton_aio.InferenceServerClient(address, **triton_tls(certs)) as client:
        assert await client.is_server_ready()
        result = await client.infer("minilm-embed", embed_input([101, 2023, 102]))
        assert result.as_numpy("embeddings").shape == (1, 384)


def test_tritonclient_without_a_certificate_is_refused(
    secure_cluster: Cluster, certs: Path
) -> None:
    address = secure_cluster.address("inference")
    client = triton.InferenceServerClient(
        address, ssl=True, root_certificates=str(certs / "ca.crt")
    )
    try:
        with pytest.raises(triton.InferenceServerException) as refused:
            client.is_server_ready(client_timeout=5)
        assert "UNAVAILABLE" in str(refused.value.status())
    finally:
        client.close()


# Secrets -------------------------------------------------------------------------------------


def test_no_private_key_reaches_a_log(secure_cluster: Cluster, certs: Path, gateway: str) -> None:
    """Every service logged its settings at start (paths only) and served TLS calls above."""
    secrets = [line for key in certs.glob("*.key") for line in _key_lines(key)]
    for replica in secure_cluster.all():
        log = replica.log_path.read_text()
        assert "PRIVATE KEY" not in log, replica.service
        assert not [s for s in secrets if s in log], replica.service
        assert str(certs / f"{replica.service}.key") in log  # the path is what is logged


def _key_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if not line.startswith("-----")]


def test_each_service_says_how_it_listens(secure_cluster: Cluster) -> None:
    for replica in secure_cluster.all():
        # gRPC's own C core writes plain lines too (a refused handshake): read fmserve's JSON.
        text = replica.log_path.read_text().splitlines()
        lines = [json.loads(line) for line in text if line.startswith("{")]
        (serving,) = [line for line in lines if line.get("msg") == "serving"]
        assert serving["tls"] == ("server" if replica.service == "gateway" else "mutual")
