"""A submission that RabbitMQ cannot take, through the gateway's job code with a real cache
service: the client and the job record both hear what became of the job, in words that name no
host, port, queue or library."""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fmserve.cli.cluster import free_port
from fmserve.core.repository import ModelRepository
from fmserve.errors import Unavailable
from fmserve.queue.broker import Broker
from fmserve.queue.topology import Topology
from fmserve.v1 import jobs_pb2
from services.gateway.jobs import Jobs, Submission
from services.gateway.routes import Router
from services.gateway.settings import GatewaySettings
from tests.integration.conftest import job_records

pytestmark = pytest.mark.timeout(60)

INTERNALS = ("127.0.0.1", "5672", "amqp", "RabbitMQ at", "aiormq", "preprocess.", "retried")


async def texts() -> AsyncIterator[list[str]]:
    yield ["one text", "another"]


async def test_a_submission_rabbitmq_cannot_take_says_the_job_failed(
    redis_url: str, prefix: str, model_repository: Path
) -> None:
    port = free_port()  # nothing listens here: RabbitMQ is "down"
    settings = GatewaySettings(model_repository=model_repository, publish_timeout_s=1.0)
    broker = Broker(f"amqp://guest:guest@127.0.0.1:{port}/", Topology(f"{prefix}."), 1.0)
    await broker.start(connect_wait_s=0.2)
    router = Router(ModelRepository(model_repository), 64, 1000)
    try:
        async with job_records(redis_url, prefix) as records:
            jobs = Jobs(router, broker, records, settings)
            with pytest.raises(Unavailable) as refused:
                await jobs.submit(Submission(model="minilm-embed"), texts())
            (job,) = await records.list(10)
    finally:
        await broker.stop()
    message = refused.value.message
    assert "the job queue" in message and "marked FAILED" in message
    assert job.state == jobs_pb2.JOB_STATE_FAILED
    assert "the job queue" in job.error
    for internal in INTERNALS:
        assert internal not in message, message
        assert internal not in job.error, job.error


def test_connection_attempts_that_fail_leave_nothing_to_close_later() -> None:
    """aio-pika's connect_robust drops a connection whose first connect failed without closing
    it; collected later, outside an event loop, it warns of a close that is never awaited (in
    whichever test the collector happens to run). The broker closes each failed attempt."""

    async def attempts() -> None:
        broker = Broker(f"amqp://guest:guest@127.0.0.1:{free_port()}/", Topology("none."), 1.0)
        await broker.start(connect_wait_s=0.5)  # a few attempts, all refused
        await broker.stop()

    asyncio.run(attempts())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gc.collect()
