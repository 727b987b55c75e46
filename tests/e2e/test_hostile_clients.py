"""What a hostile client may try against the public gateway of the running cluster: requests
that inflate, names made up by the thousand, names no model can have. Each is refused with a
clear status, and the gateway's memory and /metrics stay bounded."""

from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from fmserve import Client
from fmserve.cli.cluster import Cluster
from fmserve.errors import InvalidInput, ModelNotFound
from fmserve.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.settings import GatewaySettings
from tests.e2e.conftest import MAX_REQUEST_BYTES
from tests.processes import rss_mib

pytestmark = pytest.mark.e2e

BOMB_CHARS = 60_000_000  # ~60 KB once gzipped


def rss_mb(cluster: Cluster, service: str) -> float:
    process = cluster.replicas_of[service][0].process
    assert process is not None
    return rss_mib(process.pid)


def metrics_text(cluster: Cluster, service: str) -> str:
    port = cluster.replicas_of[service][0].metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def send_bomb(address: str) -> grpc.StatusCode:
    options = [("grpc.max_send_message_length", 2 * BOMB_CHARS)]
    with grpc.insecure_channel(address, options=options, compression=grpc.Compression.Gzip) as ch:
        request = gateway_pb2.InferRequest(model="minilm-embed", texts=["a" * BOMB_CHARS])
        try:
            gateway_pb2_grpc.GatewayStub(ch).Infer(request, timeout=60)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_requests_that_inflate_past_the_bound_are_refused_and_memory_returns(
    cluster: Cluster, gateway_address: str
) -> None:
    assert BOMB_CHARS > MAX_REQUEST_BYTES
    assert GatewaySettings().max_request_bytes < BOMB_CHARS  # the default refuses it too
    before = rss_mb(cluster, "gateway")
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(send_bomb, [gateway_address] * 8))
    after = rss_mb(cluster, "gateway")
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 8
    assert after - before < 60, f"gateway RSS {before:.0f} MB -> {after:.0f} MB"
    with Client(gateway_address) as client:
        assert client.embed(["still serving"], model="minilm-embed").shape == (1, 384)


def test_made_up_model_names_do_not_grow_metrics(cluster: Cluster, gateway_address: str) -> None:
    with Client(gateway_address) as client:
        client.embed(["warm"], model="minilm-embed")  # every series of a known model exists
        before = len(metrics_text(cluster, "gateway"))
        for i in range(300):
            with pytest.raises(ModelNotFound):
                client.embed(["x"], model=f"made-up-model-{i:04d}-" + "z" * 80)
    growth = len(metrics_text(cluster, "gateway")) - before
    assert growth < 4_000, f"/metrics grew by {growth} bytes for 300 made-up names"
    assert "made-up-model" not in metrics_text(cluster, "gateway")


@pytest.mark.parametrize("name", ["m" * 256, "../models/minilm-embed", "a/b"])
def test_a_name_no_model_can_have_is_invalid_input(gateway_address: str, name: str) -> None:
    with Client(gateway_address) as client, pytest.raises(InvalidInput, match="model name"):
        client.embed(["x"], model=name)
