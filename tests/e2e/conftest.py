"""The cluster as separate processes, started once per session through the same code path as
`fmserve up`, isolated in its own Redis database and key prefix, and stopped at the end."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from fmserve.cli.cluster import SERVICES, Cluster, free_port
from fmserve.queue.topology import Topology, delete_queues
from tests.conftest import AMQP_URL, REDIS_URL, require_server
from tests.otlp_collector import Collector

REDIS_DB = 13
MAX_ITEMS = 64
MAX_REQUEST_BYTES = 4 * 1024 * 1024
DELIVERY_LIMIT = 3
MAX_JOB_ITEMS = 5000
# Under MAX_REQUEST_BYTES, so that an item over it reaches the gateway (test_media_jobs.py).
MAX_JOB_CHUNK_BYTES = 2 * 1024 * 1024


@pytest.fixture(scope="session")
def key_prefix() -> str:
    return f"fmserve-e2e-{uuid.uuid4().hex[:8]}:"


@pytest.fixture(scope="session")
def collector() -> Iterator[Collector]:
    """Where the cluster exports its traces (OTLP over gRPC)."""
    collector = Collector()
    collector.start()
    yield collector
    collector.stop()


@pytest.fixture(scope="session")
def cluster(
    model_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
    key_prefix: str,
    collector: Collector,
) -> Iterator[Cluster]:
    env = {
        **cluster_env(model_repository, key_prefix),
        "FMSERVE_OTLP_ENDPOINT": f"127.0.0.1:{collector.port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # the SDK's own variable: export spans within 0.1 s
    }
    with running_cluster(env, tmp_path_factory.mktemp("logs"), key_prefix) as started:
        yield started


def cluster_env(model_repository: Path, key_prefix: str) -> dict[str, str]:
    """A test cluster's environment: its own Redis database, key prefix and queue prefix."""
    return {
        "FMSERVE_AMQP_URL": AMQP_URL,
        # The queues' names start with the run's own prefix (deleted at the end), so runs and
        # any real cluster on this RabbitMQ never share a queue.
        "FMSERVE_AMQP_QUEUE_PREFIX": key_prefix.replace(":", "."),
        "FMSERVE_AMQP_DELIVERY_LIMIT": str(DELIVERY_LIMIT),
        "FMSERVE_MODEL_REPOSITORY": str(model_repository),
        "FMSERVE_REDIS_URL": f"{REDIS_URL}/{REDIS_DB}",
        "FMSERVE_CACHE_KEY_PREFIX": key_prefix,
        "FMSERVE_INFERENCE_PRELOAD": "minilm-embed",
        "FMSERVE_PREPROCESS_PRELOAD": "minilm-embed",
        "FMSERVE_INFERENCE_TORCH_THREADS": "1",
        # a draining inference service ends its streams "cancelled" after this (test_generation)
        "FMSERVE_INFERENCE_GRACE_PERIOD_S": "3",
        "FMSERVE_GATEWAY_MAX_ITEMS": str(MAX_ITEMS),
        "FMSERVE_GATEWAY_JOB_MAX_ITEMS": str(MAX_JOB_ITEMS),
        "FMSERVE_GATEWAY_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
        "FMSERVE_GATEWAY_MAX_JOB_CHUNK_BYTES": str(MAX_JOB_CHUNK_BYTES),
        "FMSERVE_LOG_LEVEL": "DEBUG",
    }


@contextmanager
def running_cluster(
    env: dict[str, str], log_dir: Path, key_prefix: str, certs: Path | None = None
) -> Iterator[Cluster]:
    """The five services as processes, on free ports, started the way `fmserve up` starts them;
    stopped, and their keys and queues deleted, on the way out."""
    require_server("Redis", "127.0.0.1", 6379)
    require_server("RabbitMQ", "127.0.0.1", 5672)
    ports = {name: free_port() for name in SERVICES}
    cluster = Cluster(env=env, ports=ports, log_dir=log_dir, say=lambda _: None, certs=certs)
    try:
        cluster.start(timeout_s=180)
        yield cluster
    finally:
        cluster.stop(grace_s=5)
        forget_keys(key_prefix)
        # In a thread of its own: this thread's event loop belongs to pytest-asyncio.
        with ThreadPoolExecutor(1) as thread:
            thread.submit(asyncio.run, delete_queues(AMQP_URL, topology(key_prefix))).result()


def topology(key_prefix: str) -> Topology:
    return Topology(key_prefix.replace(":", "."), DELIVERY_LIMIT)


def forget_keys(prefix: str) -> None:
    """Delete what a test cluster left in the e2e Redis database under its key prefix."""
    client = redis.Redis.from_url(f"{REDIS_URL}/{REDIS_DB}")
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def gateway_address(cluster: Cluster) -> str:
    return cluster.address("gateway")


def metric(cluster: Cluster, service: str, name: str, **labels: str) -> float:
    """The sum of a metric's series with these labels, as the first replica of `service`
    exports it now."""
    port = cluster.replicas_of[service][0].metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(w in line for w in want)
    )
