"""fmserve.messaging and the stage worker's ack rules against the real RabbitMQ (queues under a
prefix of this module's own, deleted afterwards) and, for dead-lettering, the real cache
service and Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from fmserve.errors import Unavailable
from fmserve.jobs import DeadLetters, JobRecords
from fmserve.messaging import Broker, Consumer, Delivery, Topology, delete_queues, queue_depth
from fmserve.v1 import common_pb2, jobs_pb2
from services.cache.__main__ import build
from tests.integration.test_cache_service import DB, settings_for, with_db

pytestmark = pytest.mark.timeout(60)
LIMIT = 2


@pytest.fixture
async def broker(amqp_url: str) -> AsyncIterator[Broker]:
    topology = Topology(f"fmserve-test-{uuid.uuid4().hex[:8]}.", LIMIT)
    broker = Broker(amqp_url, topology, publish_timeout_s=2.0, name="test")
    await broker.start()
    yield broker
    await broker.stop()
    await delete_queues(amqp_url, topology)


@pytest.fixture
async def records(redis_url: str) -> AsyncIterator[JobRecords]:
    prefix = f"fmserve-test-{uuid.uuid4().hex[:8]}:"
    service = build(settings_for(with_db(redis_url, DB), prefix))
    await service.start()
    records = JobRecords(f"127.0.0.1:{service.port}")
    await records.start()
    yield records
    await records.stop()
    await service.stop()


async def consume(broker: Broker, stage: str, handler, concurrency: int = 2) -> Consumer:
    consumer = Consumer(broker, broker.topology.queues(stage), handler, stage, 8, concurrency, 1.0)
    await consumer.start()
    return consumer


async def test_published_messages_are_consumed_and_acked(broker: Broker) -> None:
    seen: list[bytes] = []
    done = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.body)
        if len(seen) == 50:
            done.set()

    await broker.publish("inference", "normal", [b"%d" % i for i in range(50)])
    consumer = await consume(broker, "inference", handler)
    await asyncio.wait_for(done.wait(), 10)
    await consumer.stop()
    assert sorted(seen) == sorted(b"%d" % i for i in range(50))
    connection = await broker.connection()
    assert await queue_depth(connection, broker.topology.queues("inference")) == 0


async def test_an_unroutable_message_raises(broker: Broker) -> None:
    with pytest.raises(Unavailable, match="could not route"):
        await broker.publish("nowhere", "normal", [b"x"])


async def test_unavailable_is_retried_without_spending_a_delivery(broker: Broker) -> None:
    calls: list[int] = []
    done = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        calls.append(delivery.deliveries)
        if len(calls) < 3:
            raise Unavailable("the cache service is down")
        done.set()

    await broker.publish("preprocess", "normal", [b"one"])
    consumer = await consume(broker, "preprocess", handler)
    await asyncio.wait_for(done.wait(), 10)
    await consumer.stop()
    assert calls == [1, 1, 1]  # the same delivery, held and retried


async def test_higher_levels_are_handled_first(broker: Broker) -> None:
    order: list[bytes] = []
    done = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        await asyncio.sleep(0.02)
        order.append(delivery.body)
        if len(order) == 8:
            done.set()

    await broker.publish("postprocess", "low", [b"low"] * 4)
    await broker.publish("postprocess", "high", [b"high"] * 4)
    consumer = await consume(broker, "postprocess", handler, concurrency=1)
    await asyncio.wait_for(done.wait(), 10)
    await consumer.stop()
    # The very first message may be whichever arrived first; after it, every high goes first.
    rest = order[1:]
    assert rest[: rest.count(b"high")] == [b"high"] * rest.count(b"high")


async def test_a_message_that_always_fails_is_dead_lettered_and_its_items_failed(
    broker: Broker, records: JobRecords
) -> None:
    job, _ = await records.create(
        jobs_pb2.Job(model="m", version="1", task=common_pb2.TASK_EMBEDDING, retention_s=60)
    )
    await records.seal(job.id, 3)
    await records.record(job.id, [jobs_pb2.JobItemResult(index=0, error="answered before")])
    chunk = jobs_pb2.JobChunk(route=jobs_pb2.JobRoute(job_id=job.id), indexes=[0, 1, 2])
    deliveries: list[int] = []

    async def crashing(delivery: Delivery) -> None:
        deliveries.append(delivery.deliveries)
        raise RuntimeError("a bug that hits this message every time")

    dead = DeadLetters(broker, records, grace_s=1.0)
    await dead.start()
    consumer = await consume(broker, "inference", crashing)
    await broker.publish("inference", "normal", [chunk.SerializeToString()])
    for _ in range(200):
        status = await records.get(job.id)
        if status.state != jobs_pb2.JOB_STATE_RUNNING:
            break
        await asyncio.sleep(0.05)
    await consumer.stop()
    await dead.stop()
    assert deliveries[:LIMIT] == list(range(1, LIMIT + 1))
    assert (status.state, status.failed) == (jobs_pb2.JOB_STATE_FAILED, 3)
    items = (await records.results(job.id, 0, 10)).items
    assert items[0].error == "answered before"  # recorded once, never overwritten
    assert items[1].error.startswith(f"dropped after {LIMIT} deliveries: the inference stage")
