"""A 100,000-item job streamed in and out through the public client, while the memory of every
cluster process is watched: each stays bounded (it streams the job), none holds the job whole.

It runs on a small cluster of its own (this module's), serving only the cheapest model, with a
job limit above 100,000: the session's cluster keeps its lower limit, which other tests submit
past."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from fmserve import Client
from fmserve.cli.cluster import SERVICES, Cluster, Replica, free_port
from fmserve.queue.topology import delete_queues
from tests.conftest import AMQP_URL, REDIS_URL, require_server
from tests.e2e.conftest import REDIS_DB, forget_keys, topology
from tests.models import build_classifier
from tests.processes import rss_mib

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ITEMS = 100_000
MODEL = "tiny-classifier"
GROWTH_BOUND_MIB = 16.0
"""Most a process's RSS may grow over its level before the job. Measured (six runs, after the
warm-up job, on a shared 2-core machine): the gateway grew 6-10 MiB (gRPC buffers of the incoming
stream and the allocator's first high-water mark: later submissions of the same size add
nothing), the inference service 4-10 MiB, preprocess, postprocess and cache under 1 MiB each.
Holding the job whole costs more: the submission as received, 25 MiB (its 200 messages 14 MiB,
their texts as strings 11 MiB); every result as a message, 87 MiB."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """This module's own cluster (it stands in for the session's, which is not started for
    it): the cheapest model only, a job limit of ITEMS, its own key and queue prefix."""
    require_server("Redis", "127.0.0.1", 6379)
    require_server("RabbitMQ", "127.0.0.1", 5672)
    models = tmp_path_factory.mktemp("models")
    build_classifier(models / MODEL / "1", seed=1)
    (models / MODEL / "model.toml").write_text('task = "text-classification"\nmax_length = 64\n')
    key_prefix = f"fmserve-e2e-big-{uuid.uuid4().hex[:8]}:"
    env = {
        "FMSERVE_AMQP_URL": AMQP_URL,
        "FMSERVE_AMQP_QUEUE_PREFIX": key_prefix.replace(":", "."),
        "FMSERVE_MODEL_REPOSITORY": str(models),
        "FMSERVE_REDIS_URL": f"{REDIS_URL}/{REDIS_DB}",
        "FMSERVE_CACHE_KEY_PREFIX": key_prefix,
        "FMSERVE_INFERENCE_PRELOAD": MODEL,
        "FMSERVE_PREPROCESS_PRELOAD": MODEL,
        "FMSERVE_INFERENCE_TORCH_THREADS": "1",
        "FMSERVE_GATEWAY_JOB_MAX_ITEMS": str(ITEMS),
        "FMSERVE_LOG_LEVEL": "INFO",
    }
    ports = {name: free_port() for name in SERVICES}
    cluster = Cluster(
        env=env, ports=ports, log_dir=tmp_path_factory.mktemp("logs"), say=lambda _: None
    )
    try:
        cluster.start(timeout_s=120)
        yield cluster
    finally:
        cluster.stop(grace_s=5)
        forget_keys(key_prefix)
        with ThreadPoolExecutor(1) as thread:  # this thread's loop belongs to pytest-asyncio
            thread.submit(asyncio.run, delete_queues(AMQP_URL, topology(key_prefix))).result()


class RssSampler:
    """Samples the RSS of every replica every second, in a thread, until stopped."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.pids = {r.service: r.process.pid for r in replicas if r.process is not None}
        self.peaks = {service: 0.0 for service in self.pids}

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> dict[str, float]:
        return {service: rss_mib(pid) for service, pid in self.pids.items()}

    def _run(self) -> None:
        while not self._stop.is_set():
            for service, mib in self.now().items():
                self.peaks[service] = max(self.peaks[service], mib)
            self._stop.wait(1.0)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def texts(count: int, tag: str) -> Iterator[str]:
    """Short texts, made one at a time: the submission never exists whole on this side. All of
    one shape (six-digit numbers), so the warm-up meets every batch shape the job brings."""
    for i in range(count):
        yield f"item {i:06d} of the big job ({tag}): words {i % 7} and {i % 11}"


def stream_through(client: Client, count: int) -> float:
    """Submit `count` items from a generator, wait, and read every result page by page,
    checking each index arrives exactly once; the seconds it took."""
    started = time.monotonic()
    job = client.submit(texts(count, uuid.uuid4().hex[:6]), model=MODEL)
    status = job.wait(timeout=240)
    assert (status.state, status.total, status.done, status.failed) == (
        "succeeded",
        count,
        count,
        0,
    ), status
    seen = bytearray(count)  # one byte per item, not the items
    for item in job.results():
        assert item.ok and item.result, item
        assert not seen[item.index], f"item {item.index} came back twice"
        seen[item.index] = 1
    assert seen.count(1) == count
    return time.monotonic() - started


def test_a_100000_item_job_streams_in_and_out_in_bounded_memory(cluster: Cluster) -> None:
    with Client(cluster.address("gateway"), timeout=60) as client:
        stream_through(client, 2000)  # warm-up: models, tokenizers, channels, buffers
        with RssSampler(cluster.all()) as sampler:
            baseline = sampler.now()
            took = stream_through(client, ITEMS)
    growth = {service: sampler.peaks[service] - baseline[service] for service in baseline}
    print(f"{ITEMS} items in and out in {took:.0f} s; RSS growth (MiB): {growth}")
    for service, mib in growth.items():
        assert mib < GROWTH_BOUND_MIB, f"{service} grew {mib:.1f} MiB while the job ran"
