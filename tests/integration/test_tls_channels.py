"""mTLS channels as the services open them, against real grpc.aio servers on loopback: one
address, a list of replicas (whose target names no host to check), and the health check
command the containers run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fmserve.cli.certs import generate
from fmserve.rpc import healthcheck, tls
from fmserve.rpc.channels import open_channel

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("certs")).folder


@pytest.fixture
async def replicas(certs: Path) -> AsyncIterator[list[int]]:
    """Two health servers requiring client certificates, as a stage's replicas do."""
    credentials = tls.from_folder(certs, "cache").server_credentials(require_client_auth=True)
    servers, ports = [], []
    for _ in range(2):
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        ports.append(server.add_secure_port("127.0.0.1:0", credentials))
        await server.start()
        servers.append(server)
    yield ports
    for server in servers:
        await server.stop(None)


async def check(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int((await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status)


@pytest.mark.parametrize("form", ["127.0.0.1:{0}", "localhost:{0}", "127.0.0.1:{0},127.0.0.1:{1}"])
async def test_every_address_form_reaches_the_replicas_over_mtls(
    certs: Path, replicas: list[int], form: str
) -> None:
    identity = tls.from_folder(certs, "gateway")
    async with open_channel(form.format(*replicas), identity=identity) as channel:
        # Round-robin over a list: several calls reach both replicas, each handshake checked.
        for _ in range(4):
            assert await check(channel) == health_pb2.HealthCheckResponse.SERVING


async def test_a_channel_without_identity_is_refused(replicas: list[int]) -> None:
    async with open_channel(f"127.0.0.1:{replicas[0]}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await check(channel)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_the_health_check_command_presents_a_certificate(
    certs: Path, replicas: list[int]
) -> None:
    address = f"127.0.0.1:{replicas[0]}"
    flags = ["--tls-cert", str(certs / "cache.crt"), "--tls-key", str(certs / "cache.key")]
    flags += ["--tls-ca", str(certs / "ca.crt")]
    # The command blocks (a container's health check): it runs off the servers' event loop.
    assert await asyncio.to_thread(healthcheck.main, [address, *flags]) == 0
    assert await asyncio.to_thread(healthcheck.main, [address, "--timeout-s", "2"]) == 1
    with pytest.raises(SystemExit):  # the three go together
        healthcheck.main([address, "--tls-cert", str(certs / "cache.crt")])
