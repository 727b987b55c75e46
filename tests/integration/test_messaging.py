"""fmserve.queue (broker, consumer, dead letters) and the stage worker's ack rules against the
real RabbitMQ (queues under a prefix of this module's own, deleted afterwards) and, for
dead-lettering, the real cache service and Redis."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from fmserve.errors import DeadlineExceeded, FmserveError, Overloaded, Unavailable
from fmserve.queue.broker import Broker
from fmserve.queue.consumer import Consumer, Delivery, queue_depth
from fmserve.queue.dead_letters import DeadLetters
from fmserve.queue.records import JobRecords
from fmserve.queue.topology import Topology, delete_queues
from fmserve.v1 import common_pb2, jobs_pb2
from tests.integration.conftest import job_records

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
async def records(redis_url: str, prefix: str, redis: Redis) -> AsyncIterator[JobRecords]:
    """Job records in a cache service of this module's own key prefix (cleared afterwards)."""
    async with job_records(redis_url, prefix) as records:
        yield records


async def consume(
    broker: Broker, stage: str, handler, concurrency: int = 2, hold_s: float = 30.0
) -> Consumer:
    queues = broker.topology.queues(stage)
    consumer = Consumer(broker, queues, handler, stage, 8, concurrency, 1.0, hold_s)
    await consumer.start()
    return consumer


async def eventually(predicate: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.05)


async def new_job(records: JobRecords, items: int) -> jobs_pb2.JobChunk:
    """A sealed job of `items` items, and the chunk that carries them all."""
    job, _ = await records.create(
        jobs_pb2.Job(model="m", version="1", task=common_pb2.TASK_EMBEDDING, retention_s=60)
    )
    await records.seal(job.id, items)
    return jobs_pb2.JobChunk(route=jobs_pb2.JobRoute(job_id=job.id), indexes=range(items))


async def until_ended(records: JobRecords, job_id: str) -> jobs_pb2.Job:
    for _ in range(200):
        status = await records.get(job_id)
        if status.state not in (jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING):
            break
        await asyncio.sleep(0.05)
    return status


def dead_lettered(stage: str) -> float:
    name = "fmserve_queue_messages_dead_lettered_total"
    return REGISTRY.get_sample_value(name, {"stage": stage}) or 0.0


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


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


async def test_an_unroutable_message_raises(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING), pytest.raises(Unavailable) as refused:
        await broker.publish("nowhere", "normal", [b"x"])
    assert refused.value.message == "the job queue refused a message"  # no names: it is public
    assert any("nowhere" in r.getMessage() for r in caplog.records)  # the log says which


@pytest.mark.parametrize(
    "error",
    [
        Unavailable("the cache service is down"),
        Overloaded("300 items already queued; retry shortly"),
        DeadlineExceeded("the deadline expired"),
    ],
)
async def test_transient_errors_are_retried_without_spending_a_delivery(
    broker: Broker, error: FmserveError
) -> None:
    calls: list[int] = []
    done = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        calls.append(delivery.deliveries)
        if len(calls) < 3:
            raise error
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
    chunk = await new_job(records, 3)
    job_id = chunk.route.job_id
    await records.record(job_id, [jobs_pb2.JobItemResult(index=0, error="answered before")])
    deliveries: list[int] = []

    async def crashing(delivery: Delivery) -> None:
        deliveries.append(delivery.deliveries)
        raise RuntimeError("a bug that hits this message every time")

    before = dead_lettered("inference")
    dead = DeadLetters(broker, records, grace_s=1.0)
    await dead.start()
    consumer = await consume(broker, "inference", crashing)
    await broker.publish("inference", "normal", [chunk.SerializeToString()])
    status = await until_ended(records, job_id)
    await consumer.stop()
    await dead.stop()
    # x-delivery-limit counts redeliveries: the first delivery and LIMIT more, then dead.
    assert deliveries == list(range(1, LIMIT + 2))
    assert dead_lettered("inference") - before == 1
    assert (status.state, status.failed) == (jobs_pb2.JOB_STATE_FAILED, 3)
    items = (await records.results(job_id, 0, 10)).items
    assert items[0].error == "answered before"  # recorded once, never overwritten
    assert items[1].error.startswith(f"dropped after {LIMIT + 1} deliveries: the inference stage")


async def test_a_transient_error_that_never_passes_ends_dead_lettered(
    broker: Broker, records: JobRecords
) -> None:
    # A model whose files are broken raises LoadFailed (an Unavailable) every time: holding
    # its message must end, or the job never would.
    chunk = await new_job(records, 2)
    attempts: list[int] = []

    async def broken_model(delivery: Delivery) -> None:
        attempts.append(delivery.deliveries)
        raise Unavailable("model 'm' version 1 cannot be loaded: its weights are missing")

    dead = DeadLetters(broker, records, grace_s=1.0)
    await dead.start()
    consumer = await consume(broker, "postprocess", broken_model, hold_s=1.0)
    await broker.publish("postprocess", "normal", [chunk.SerializeToString()])
    status = await until_ended(records, chunk.route.job_id)
    await consumer.stop()
    await dead.stop()
    assert sorted(set(attempts)) == list(range(1, LIMIT + 2))
    assert all(attempts.count(n) >= 2 for n in set(attempts))  # held and retried each time
    assert (status.state, status.failed) == (jobs_pb2.JOB_STATE_FAILED, 2)


async def test_a_held_message_leaves_its_slot_to_others(broker: Broker) -> None:
    handled = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        if delivery.body == b"stuck":
            raise Unavailable("model 'm' is not ready")
        handled.set()

    await broker.publish("preprocess", "normal", [b"stuck"])
    await broker.publish("preprocess", "normal", [b"fine"])
    consumer = await consume(broker, "preprocess", handler, concurrency=1)
    await asyncio.wait_for(handled.wait(), 5)  # while "stuck" waits between its retries
    started = time.monotonic()
    await consumer.stop()
    assert time.monotonic() - started < 0.9  # the pause ended at once, not after the grace


async def test_a_queue_declared_with_other_arguments_is_logged_saying_what_to_do(
    broker: Broker, amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    other = Broker(amqp_url, Topology(broker.topology.prefix, LIMIT + 1), 1.0, name="other")
    with caplog.at_level(logging.ERROR, logger="fmserve.queue"):
        await other.start(connect_wait_s=1.0)
        await other.stop()
    assert any(
        "FMSERVE_AMQP_DELIVERY_LIMIT" in m and f"{broker.topology.prefix}preprocess" in m
        for m in errors(caplog)
    ), errors(caplog)


async def test_a_consumer_that_cannot_subscribe_says_so_and_keeps_trying(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    name = broker.topology.queue("extra")  # a queue nobody has declared (yet)
    got = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        got.set()

    consumer = Consumer(broker, [name], handler, "extra", grace_s=1.0)
    connection = await broker.connection()
    try:
        with caplog.at_level(logging.ERROR, logger="fmserve.queue"):
            await consumer.start()
            await eventually(lambda: any(name in m for m in errors(caplog)))
        async with connection.channel() as channel:
            await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        await broker.publish("extra", "normal", [b"x"])
        await asyncio.wait_for(got.wait(), 10)
    finally:
        await consumer.stop()
        async with connection.channel() as channel:
            await channel.queue_delete(name)
