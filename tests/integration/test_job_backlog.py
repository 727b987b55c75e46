"""The gateway's bound on the job queue against the real RabbitMQ (queues under a prefix of this
test's own, deleted afterwards) and a real cache service: a submission is refused with
RESOURCE_EXHAUSTED while more chunks than the bound wait, at its start and while it streams."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from fmserve.core.repository import ModelRepository
from fmserve.errors import Overloaded
from fmserve.queue.broker import Broker
from fmserve.queue.records import JobRecords
from fmserve.queue.topology import Topology, delete_queues
from fmserve.v1 import jobs_pb2
from services.gateway.jobs import Jobs, Submission
from services.gateway.routes import Router
from services.gateway.settings import GatewaySettings
from tests.integration.conftest import job_records

pytestmark = pytest.mark.timeout(60)
BOUND = 5


@pytest.fixture
async def broker(amqp_url: str) -> AsyncIterator[Broker]:
    topology = Topology(f"fmserve-test-backlog-{uuid.uuid4().hex[:8]}.")
    broker = Broker(amqp_url, topology, publish_timeout_s=5.0, name="test")
    await broker.start()
    yield broker
    await broker.stop()
    await delete_queues(amqp_url, topology)


@pytest.fixture
async def records(redis_url: str, prefix: str) -> AsyncIterator[JobRecords]:
    async with job_records(redis_url, prefix) as records:
        yield records


@pytest.fixture
def jobs(broker: Broker, records: JobRecords, model_repository: Path) -> Jobs:
    """One item per chunk, each confirmed before the next, the depth read before every chunk."""
    settings = GatewaySettings(
        model_repository=model_repository,
        job_chunk_size=1,
        job_publish_window=1,
        job_queue_max_messages=BOUND,
        job_queue_depth_cache_s=0.0,
    )
    return Jobs(Router(ModelRepository(model_repository), 64, 1000), broker, records, settings)


async def texts(count: int) -> AsyncIterator[list[str]]:
    for i in range(count):
        yield [f"text {i}"]


async def test_a_full_queue_refuses_a_submission_before_it_creates_anything(
    jobs: Jobs, broker: Broker, records: JobRecords
) -> None:
    first = await jobs.submit(Submission(model="minilm-embed"), texts(BOUND + 1))
    assert await broker.ready_messages("preprocess") == BOUND + 1
    with pytest.raises(Overloaded) as refused:
        await jobs.submit(Submission(model="minilm-embed"), texts(1))
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the job queue is full" in refused.value.message
    assert "retry" in refused.value.message
    assert [job.id for job in await records.list(1)] == [first.id]  # nothing created
    assert await broker.ready_messages("preprocess") == BOUND + 1  # nothing published


async def test_a_stream_is_refused_once_the_queue_fills_while_it_runs(
    jobs: Jobs, broker: Broker, records: JobRecords
) -> None:
    with pytest.raises(Overloaded, match="the job queue is full"):
        await jobs.submit(Submission(model="minilm-embed"), texts(100))
    assert await broker.ready_messages("preprocess") == BOUND + 1  # not 100
    (job,) = await records.list(1)  # the newest
    assert job.state == jobs_pb2.JOB_STATE_FAILED and "the job queue is full" in job.error
