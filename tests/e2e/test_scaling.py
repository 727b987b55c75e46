"""The compose set-up as local processes: the same commands and environment as
deploy/compose/compose.yaml, with two inference and two preprocess replicas behind one gateway.

Translated for this machine, and only this: addresses and ports (compose's service names and
fixed ports become 127.0.0.1 and free ports, which `Cluster` assigns per replica), the model
repository, Redis and RabbitMQ (the tests' own), and one torch thread per inference replica
(two replicas share two cores here)."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fmserve import AsyncClient, Client
from fmserve.cli.cluster import SERVICES, Cluster, Replica, free_port
from fmserve.core import apikeys
from fmserve.core.settings import ServiceSettings
from fmserve.queue.topology import Topology, delete_queues
from fmserve.rpc.service import Service
from services.gateway.settings import GatewaySettings
from tests.conftest import AMQP_URL, REDIS_URL, require_server
from tests.deployment import (
    COMPOSE_FILE,
    dashboards,
    environment,
    expressions,
    load_yaml,
    metric_names,
    readme_gauges,
    readme_metrics,
    scrape,
)
from tests.e2e.conftest import REDIS_DB, forget_keys
from tests.images import drawn, encoded

pytestmark = pytest.mark.e2e

REPLICAS = {"inference": 2, "preprocess": 2}
ADMIN_KEY = apikeys.generate().api_key

# Added to compose's environment: this run's own Redis keys and RabbitMQ queues.
ISOLATION = ("FMSERVE_CACHE_KEY_PREFIX", "FMSERVE_AMQP_QUEUE_PREFIX")
# Set per replica by Cluster (as compose gives each container its own address).
_PER_REPLICA = ("_PORT", "_METRICS_PORT", "_HOST", "_ADDRESS")
# Each container's own certificate, at paths inside the containers: this run is plaintext (TLS
# end to end is tests/e2e/test_tls.py's; compose's TLS wiring is tests/unit/test_compose.py's).
_CONTAINER_TLS = ("FMSERVE_TLS_CERT", "FMSERVE_TLS_KEY", "FMSERVE_TLS_CA")
# README metrics that only move when something fails.
ONLY_ON_FAILURE = {
    "fmserve_cache_redis_errors_total",
    "fmserve_gateway_retried_requests_total",
    "fmserve_gateway_limit_refusals_total",  # an API key over its limits (test_key_limits.py)
    # and only under a traffic policy with a shadow version (counted in test_rollouts.py)
    "fmserve_gateway_shadow_requests_total",
    # and only when a policy is rolled back, by hand or by a broken guard (test_rollouts.py)
    "fmserve_gateway_rollbacks_total",
}
# How long the gateway keeps a result in its own memory (compose leaves the default).
NEAR_CACHE_TTL_S = GatewaySettings.model_fields["near_cache_ttl_s"].default
# Dashboard metrics that no fmserve service exports: RabbitMQ's (per-object endpoint, names from
# the rabbitmq_prometheus plugin) and Prometheus's own `up`.
EXTERNAL = {
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_consumers",
    "up",
}


def compose_environment(overrides: dict[str, str]) -> dict[str, str]:
    """Every fmserve service's compose environment in one mapping (the variable names carry the
    service), less what Cluster sets per replica, with this machine's `overrides`."""
    services = load_yaml(COMPOSE_FILE)["services"]
    env: dict[str, str] = {}
    for name in SERVICES:
        for variable, value in environment(services[name]).items():
            if variable.endswith(_PER_REPLICA) or variable in _CONTAINER_TLS:
                continue
            assert env.setdefault(variable, value) == value, f"{variable} differs across services"
    assert set(overrides) <= set(env) | set(ISOLATION), "translate, don't add"
    return {**env, **overrides}


@pytest.fixture(scope="module")
def scaled(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_server("Redis", "127.0.0.1", 6379)
    require_server("RabbitMQ", "127.0.0.1", 5672)
    prefix = f"fmserve-scaling-{uuid.uuid4().hex[:8]}"
    env = compose_environment(
        {
            "FMSERVE_MODEL_REPOSITORY": str(model_repository),
            "FMSERVE_REDIS_URL": f"{REDIS_URL}/{REDIS_DB}",
            "FMSERVE_AMQP_URL": AMQP_URL,
            "FMSERVE_CACHE_KEY_PREFIX": f"{prefix}:",
            "FMSERVE_AMQP_QUEUE_PREFIX": f"{prefix}.",
            "FMSERVE_INFERENCE_TORCH_THREADS": "1",
            # what the README asks of `--scale inference=2`: two batches in flight per replica
            "FMSERVE_GATEWAY_MAX_BATCHES_IN_FLIGHT": str(2 * REPLICAS["inference"]),
            # Compose runs with auth on and takes its admin key from `.env`: this run's own.
            "FMSERVE_ADMIN_KEY": ADMIN_KEY,
        }
    )
    ports = {name: free_port() for name in SERVICES}
    cluster = Cluster(
        env=env,
        ports=ports,
        replicas=REPLICAS,
        log_dir=tmp_path_factory.mktemp("scaling-logs"),
        say=lambda _: None,
    )
    try:
        cluster.start(timeout_s=180)
        yield cluster
    finally:
        cluster.stop(grace_s=5)
        # In a thread of its own: this thread's event loop belongs to pytest-asyncio.
        with ThreadPoolExecutor(1) as thread:
            topology = Topology(f"{prefix}.")
            thread.submit(asyncio.run, delete_queues(AMQP_URL, topology)).result()
        forget_keys(f"{prefix}:")


def scrape_service(cluster: Cluster, service: str) -> list[dict[str, float]]:
    return [scrape(r.metrics_port) for r in cluster.replicas_of[service]]


def model_infer_calls(replica: Replica) -> float:
    return scrape(replica.metrics_port).get("fmserve_inference_requests_total", 0.0)


def texts_computed(replica: Replica) -> float:
    """Texts the replica's forward passes held (its batch sizes' sum), however batched."""
    return scrape(replica.metrics_port).get("fmserve_inference_batch_size_sum", 0.0)


def send(cluster: Cluster, count: int, model: str = "minilm-embed") -> None:
    with Client(cluster.address("gateway"), api_key=ADMIN_KEY) as client:
        for i in range(count):
            client.infer([f"sentence {i} {uuid.uuid4().hex[:8]}"], model, cache="bypass")


def test_the_compose_set_up_spreads_traffic_over_both_replicas(scaled: Cluster) -> None:
    inference = scaled.replicas_of["inference"]
    before = [model_infer_calls(r) for r in inference]
    send(scaled, 20)
    after = [model_infer_calls(r) for r in inference]
    taken = [a - b for a, b in zip(after, before, strict=True)]
    assert all(t >= 5 for t in taken), f"calls per inference replica: {taken}"
    tokenized = [
        m["fmserve_preprocess_requests_total"] for m in scrape_service(scaled, "preprocess")
    ]
    assert all(t >= 5 for t in tokenized), f"calls per preprocess replica: {tokenized}"


def test_every_readme_metric_moves_and_the_dashboards_use_only_real_names(scaled: Cluster) -> None:
    before = {s: scrape_service(scaled, s) for s in SERVICES}
    with Client(scaled.address("gateway"), api_key=ADMIN_KEY) as client:
        send(scaled, 4)
        client.classify(["a first text for tiny"], model="tiny-classifier")  # loads a model
        time.sleep(0.5)  # stores are not awaited by the reply
        client.classify(["a first text for tiny"], model="tiny-classifier")  # the gateway's hit
        time.sleep(NEAR_CACHE_TTL_S + 0.2)  # gone from the gateway's memory, kept in Redis
        client.classify(["a first text for tiny"], model="tiny-classifier")  # the cache's hit
        client.classify_images([encoded(drawn())], model="tiny-vit")  # preprocess's Featurize
        for _ in range(2):  # sampled, so never cached: the engine's metrics move too
            client.generate("a prompt", model="tiny-llama", max_new_tokens=8, temperature=1)
    after = {s: scrape_service(scaled, s) for s in SERVICES}
    gauges = readme_gauges()
    for name in readme_metrics():
        service = name.split("_")[1]
        sample = name if name.endswith("_total") or name in gauges else f"{name}_count"
        assert all(sample in m for m in after[service]), f"{name} is not exported"
        if name in gauges:
            continue  # a level, back where it was once the traffic is over: exported is enough
        moved = sum(m[sample] for m in after[service]) - sum(
            m.get(sample, 0.0) for m in before[service]
        )
        assert moved > 0 or name in ONLY_ON_FAILURE, f"{name} did not move"
    exported = {sample for pages in after.values() for page in pages for sample in page}
    for dashboard in dashboards().values():
        used = set().union(*(metric_names(e) for e in expressions(dashboard)))
        assert used - EXTERNAL <= exported, f"not exported: {sorted(used - EXTERNAL - exported)}"


async def _load(address: str, stop: asyncio.Event) -> tuple[int, list[str]]:
    """Requests one after another until `stop`; (answered, errors)."""
    answered, errors = 0, []
    async with AsyncClient(address, api_key=ADMIN_KEY) as client:
        while not stop.is_set():
            try:
                await client.infer([f"load {uuid.uuid4().hex}"], "minilm-embed", cache="bypass")
                answered += 1
            except Exception as exc:
                errors.append(repr(exc))
    return answered, errors


async def test_killing_an_inference_replica_mid_load_keeps_the_sync_path_serving(
    scaled: Cluster,
) -> None:
    # Runs last in this module: it leaves one inference replica dead.
    gateway = scaled.replicas_of["gateway"][0]
    survivor, victim = scaled.replicas_of["inference"]
    before, served_before = scrape(gateway.metrics_port), texts_computed(survivor)
    errors_before = scrape(gateway.metrics_port, code="!OK")["fmserve_gateway_requests_total"]
    stop = asyncio.Event()
    loads = [asyncio.create_task(_load(gateway.address, stop)) for _ in range(8)]
    await asyncio.sleep(1.5)
    assert victim.process is not None
    # Frozen first, so calls pile up on the victim's open connection; then killed: every one of
    # them fails with UNAVAILABLE mid-call, and the channel's retry policy must save it.
    victim.process.send_signal(signal.SIGSTOP)
    await asyncio.sleep(0.5)
    victim.process.send_signal(signal.SIGKILL)
    await asyncio.sleep(2.5)
    stop.set()
    results = await asyncio.gather(*loads)
    answered = sum(a for a, _ in results)
    errors = [e for _, errs in results for e in errs]
    assert victim.process.wait(5) == -signal.SIGKILL
    assert not errors, errors[:3]
    assert answered > 20
    after = scrape(gateway.metrics_port)
    # What the dashboards show: the gateway's requests all OK (error ratio 0), and the calls
    # the victim dropped arriving at the survivor as retries ("Retried calls per stage").
    calls = after["fmserve_gateway_requests_total"] - before["fmserve_gateway_requests_total"]
    assert calls == answered
    errors_after = scrape(gateway.metrics_port, code="!OK")["fmserve_gateway_requests_total"]
    assert errors_after == errors_before
    assert texts_computed(survivor) - served_before > answered / 2
    assert scrape(survivor.metrics_port)["fmserve_inference_retried_requests_total"] > 0


async def test_servers_close_connections_after_their_max_age_so_clients_re_resolve() -> None:
    """What lets `docker compose up --scale` add replicas under load: a channel re-resolves DNS
    only when a connection closes, and a server closes each one after max_connection_age_s."""
    settings = ServiceSettings(port=0, metrics_port=-1, max_connection_age_s=0.5)
    service = Service("scaling_probe", settings, [])
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert channel.get_state() is grpc.ChannelConnectivity.READY
            await asyncio.wait_for(channel.wait_for_state_change(grpc.ChannelConnectivity.READY), 3)
            assert channel.get_state() is grpc.ChannelConnectivity.IDLE
    finally:
        await service.stop()
