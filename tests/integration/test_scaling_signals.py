"""The signals deploy/k8s's autoscalers read rise under load and fall when it ends:

- on a real inference service, `fmserve_inference_requests_in_flight` (the interceptor's gauge,
  the same code for every service) and `fmserve_inference_queued_sequences` (its batchers'
  queues), read from the exposition text Prometheus scrapes. The load is made exact rather
  than timed: the model's forward pass is held until the test lets it go, so every call stays
  in flight and every sequence but the running batch's waits;
- on the real RabbitMQ, the messages ready in the queues a worker's rabbitmq triggers name,
  read as KEDA's amqp mode reads them (a passive declaration's message count), while fmserve's
  broker publishes a job's chunks and a consumer drains them.

KEDA asks for ceil(metric / target) replicas, the largest over a ScaledObject's triggers; the
targets are the rendered ScaledObjects', and deploy/k8s/README.md states the counts measured
here."""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import numpy as np
import pytest
import tritonclient.grpc.aio as triton
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import InferInput

from fmserve.queue.broker import Broker, queue_depth
from fmserve.queue.topology import Topology, delete_queues
from services.inference.__main__ import build
from services.inference.runner import Runner
from services.inference.settings import InferenceSettings
from tests.kubernetes import K8S_DIR, Manifests, render

pytestmark = pytest.mark.timeout(60)

MODEL = "tiny-classifier"  # max_batch_size 8 (tests/models.py)
CALLS = 40
SEQUENCES_PER_CALL = 2
JOB_ITEMS, CHUNK_ITEMS = 10_000, 32  # a 10,000-item job in the gateway's default chunks


class HeldForward:
    """Runner.forward that waits for `release` before computing, and records batch sizes."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.batches: list[int] = []
        self._forward = Runner.forward

    def __call__(self, runner: Runner, sequences: list[np.ndarray]) -> Any:
        self.batches.append(len(sequences))
        assert self.release.wait(30), "the test never released the forward pass"
        return self._forward(runner, sequences)


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldForward]:
    hold = HeldForward()
    monkeypatch.setattr(Runner, "forward", lambda runner, sequences: hold(runner, sequences))
    yield hold
    hold.release.set()  # never leave an executor thread waiting


def scraped() -> dict[str, float]:
    """The inference service's two scaling series, summed over labels, from the exposition
    text (what Prometheus stores, and KEDA's `sum(...)` queries add up)."""
    text = generate_latest(REGISTRY).decode()
    wanted = {"fmserve_inference_requests_in_flight", "fmserve_inference_queued_sequences"}
    totals = dict.fromkeys(wanted, 0.0)
    for family in text_string_to_metric_families(text):
        if family.name in wanted:
            totals[family.name] += sum(sample.value for sample in family.samples)
    return totals


def targets() -> dict[str, int]:
    """The inference ScaledObject's per-replica targets, by the metric each trigger reads."""
    scaled = Manifests(render("cpu")).one("ScaledObject", "inference")["spec"]
    (prometheus,) = [t for t in scaled["triggers"] if t["type"] == "prometheus"]
    return {"fmserve_inference_queued_sequences": int(prometheus["metadata"]["threshold"])}


def call(ids: np.ndarray) -> list[InferInput]:
    flat = ids.reshape(-1)
    lengths = np.full(SEQUENCES_PER_CALL, ids.shape[1], dtype=np.int32)
    inputs = [InferInput("input_ids", [flat.size], "INT64"), InferInput("lengths", [2], "INT32")]
    inputs[0].set_data_from_numpy(flat)
    inputs[1].set_data_from_numpy(lengths)
    return inputs


async def until(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the metrics never got there"
        await asyncio.sleep(0.01)


async def test_in_flight_and_queue_depth_rise_under_load_and_fall_after(
    model_repository: Path, held: HeldForward
) -> None:
    settings = InferenceSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,  # read from the registry /metrics would serve
        grace_period_s=1.0,
        model_repository=model_repository,
        worker_enabled=False,
        preload=MODEL,
        heap_trim_idle_s=0,  # no trims between the held batches: nothing else runs meanwhile
    )
    held.release.set()  # the preload's warm-up runs freely
    service = build(settings)
    await service.start()
    client = triton.InferenceServerClient(f"127.0.0.1:{service.port}")
    try:
        held.release.clear()
        held.batches.clear()
        idle = scraped()
        assert idle == dict.fromkeys(idle, 0.0)
        ids = np.array([[1, 5, 6, 2]] * SEQUENCES_PER_CALL, dtype=np.int64)
        calls = [asyncio.ensure_future(client.infer(MODEL, call(ids))) for _ in range(CALLS)]
        await until(lambda: scraped()["fmserve_inference_requests_in_flight"] == CALLS)
        await until(lambda: len(held.batches) == 1)
        loaded = scraped()
        running = held.batches[0]
        assert loaded == {
            "fmserve_inference_requests_in_flight": CALLS,
            "fmserve_inference_queued_sequences": CALLS * SEQUENCES_PER_CALL - running,
        }
        target = targets()["fmserve_inference_queued_sequences"]
        queued = int(loaded["fmserve_inference_queued_sequences"])
        replicas = math.ceil(queued / target)
        assert replicas == 2, "one pod's queue past one full batch asks for a second pod"
        readme = (K8S_DIR / "README.md").read_text()
        assert f"ceil({queued} / {target}) = {replicas}" in readme, "README states the measure"

        held.release.set()
        answers = await asyncio.gather(*calls)
        assert len(answers) == CALLS
        await until(lambda: scraped() == dict.fromkeys(loaded, 0.0))
        assert math.ceil(scraped()["fmserve_inference_queued_sequences"] / target) == 0
    finally:
        held.release.set()
        await client.close()
        await service.stop()


async def test_queue_depth_starts_workers_and_draining_takes_them_to_zero(amqp_url: str) -> None:
    scaled = Manifests(render("cpu")).one("ScaledObject", "inference-worker")["spec"]
    topology = Topology(f"fmserve-test-scaling-{uuid.uuid4().hex[:8]}.")
    # The triggers' queue names under this test's prefix (the workers' default is "fmserve.").
    triggers = {
        t["metadata"]["queueName"].replace("fmserve.", topology.prefix, 1): int(
            t["metadata"]["value"]
        )
        for t in scaled["triggers"]
    }
    assert sorted(triggers) == sorted(topology.queues("inference"))
    broker = Broker(amqp_url, topology, publish_timeout_s=10.0, name="test")
    await broker.start()
    connection = await aio_pika.connect_robust(amqp_url)
    try:

        async def replicas() -> int:
            """What the HPA asks for: the largest ceil(ready / value) over the triggers."""
            depths = {q: await queue_depth(connection, [q]) for q in triggers}
            return max(math.ceil(depths[q] / value) for q, value in triggers.items())

        assert await replicas() == 0, "no job: no worker"
        chunks = math.ceil(JOB_ITEMS / CHUNK_ITEMS)
        # What the preprocess workers forward to inference: one message per chunk.
        await broker.publish("inference", "normal", [b"chunk"] * chunks)
        assert await queue_depth(connection, [topology.queue("inference")]) == chunks
        workers = await replicas()
        assert workers == 4
        readme = (K8S_DIR / "README.md").read_text()
        value = triggers[topology.queue("inference")]
        assert f"({chunks} chunks) thus starts {workers} inference" in readme
        assert f"ceil({chunks} / {value})" in readme

        async with connection.channel() as channel:  # the workers drain the queue
            queue = await channel.get_queue(topology.queue("inference"))
            for _ in range(chunks):
                message = await queue.get(timeout=5)
                assert message is not None
                await message.ack()
        assert await replicas() == 0, "an empty queue lets the workers go to zero"
    finally:
        await connection.close()
        await broker.stop()
        await delete_queues(amqp_url, topology)
