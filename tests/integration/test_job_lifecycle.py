"""A job's lifecycle on time, whoever dies: the cache service in-process against the real Redis
(a short submission lease, a fast sweep), read straight from Redis where a read through the
service would itself end an overdue job, and the gateway's submission with an in-memory queue."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
from redis.asyncio import Redis

from fmserve.core.jobs import JobState
from fmserve.core.repository import ModelRepository
from fmserve.errors import Conflict
from fmserve.queue.broker import Broker
from fmserve.queue.records import JobRecords
from fmserve.v1 import common_pb2, jobs_pb2
from services.cache import job_codec
from services.cache.job_store import RedisJobStore
from services.cache.jobs import JobBook
from services.cache.store import RedisStore
from services.gateway.jobs import Jobs, Submission
from services.gateway.routes import Router
from services.gateway.settings import GatewaySettings
from tests.integration.conftest import DB, job_records, settings_for, with_db

pytestmark = pytest.mark.timeout(30)

LEASE_S = 1.0


@pytest.fixture(scope="module")
async def records(redis_url: str, prefix: str, redis: Redis) -> AsyncIterator[JobRecords]:
    async with job_records(
        redis_url, prefix, job_lease_s=LEASE_S, job_sweep_interval_s=0.1
    ) as records:
        yield records


def now_ms() -> int:
    return int(time.time() * 1000)


def template(key: str = "", expires_ms: int = 0) -> jobs_pb2.Job:
    return jobs_pb2.Job(
        model="minilm-embed",
        task=common_pb2.TASK_EMBEDDING,
        retention_s=60,
        idempotency_key=key,
        expires_unix_ms=expires_ms,
    )


def ok(index: int) -> jobs_pb2.JobItemResult:
    result = common_pb2.Result(embedding=common_pb2.Embedding(values=[1.0]))
    return jobs_pb2.JobItemResult(index=index, result=result)


async def stored_state(redis: Redis, prefix: str, job_id: str) -> tuple[str, str]:
    """(state, error) as Redis holds them: no read through the service, which expires lazily."""
    state, error = await redis.hmget(f"{prefix}job:{job_id}", ["state", "error"])
    return state.decode(), (error or b"").decode()


async def test_an_unsealed_job_whose_submission_stopped_fails_on_its_own(
    records: JobRecords, redis: Redis, prefix: str
) -> None:
    job, _ = await records.create(template())  # and its gateway dies: nobody renews, seals
    assert await redis.ttl(f"{prefix}job:{job.id}") > 0  # kept for a while, not forever
    await asyncio.sleep(LEASE_S + 0.6)
    state, error = await stored_state(redis, prefix, job.id)
    assert state == JobState.FAILED and "the submission stopped before it was complete" in error
    listed = {j.id: j for j in await records.list(50)}[job.id]
    assert listed.state == jobs_pb2.JOB_STATE_FAILED


async def test_a_renewed_lease_keeps_a_slow_submission_alive(
    records: JobRecords, redis: Redis, prefix: str
) -> None:
    job, _ = await records.create(template())
    for _ in range(6):
        await asyncio.sleep(LEASE_S / 3)
        assert (await records.renew(job.id)).state == jobs_pb2.JOB_STATE_QUEUED
    await records.record(job.id, [ok(0)])
    done = await records.seal(job.id, 1)
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED
    await asyncio.sleep(LEASE_S + 0.3)  # a sealed job holds no lease
    assert (await stored_state(redis, prefix, job.id))[0] == JobState.SUCCEEDED


async def test_the_key_of_a_submission_still_streaming_is_refused_never_joined(
    records: JobRecords,
) -> None:
    key = uuid.uuid4().hex
    first, _ = await records.create(template(key))
    with pytest.raises(Conflict, match="still in progress"):
        await records.create(template(key))
    await records.seal(first.id, 2)
    again, created = await records.create(template(key))
    assert again.id == first.id and not created


async def test_the_key_of_a_submission_that_stopped_starts_a_new_job(records: JobRecords) -> None:
    key = uuid.uuid4().hex
    first, _ = await records.create(template(key))
    await asyncio.sleep(LEASE_S + 0.1)  # lapsed, whether or not the sweep has run yet
    second, created = await records.create(template(key))
    assert created and second.id != first.id
    assert (await records.get(first.id)).state == jobs_pb2.JOB_STATE_FAILED


async def test_a_job_past_its_timeout_is_expired_on_time_without_reads(
    records: JobRecords, redis: Redis, prefix: str
) -> None:
    job, _ = await records.create(template(expires_ms=now_ms() + 1000))
    await records.record(job.id, [ok(0)])
    await records.seal(job.id, 2)  # sealed: only its deadline can end it now
    await asyncio.sleep(1.6)
    state, error = await stored_state(redis, prefix, job.id)
    assert state == JobState.EXPIRED and "timeout" in error
    listed = {j.id: j for j in await records.list(50)}[job.id]
    assert listed.state == jobs_pb2.JOB_STATE_EXPIRED
    assert await records.record(job.id, [ok(1)]) == 0
    assert (await records.get(job.id)).state == jobs_pb2.JOB_STATE_EXPIRED


async def test_the_last_items_recorded_after_the_deadline_expire_the_job(
    redis_url: str, prefix: str, redis: Redis
) -> None:
    # No sweeper here: the record script itself must refuse to complete a job that is late.
    store = RedisStore(settings_for(with_db(redis_url, DB), prefix))
    await store.start()
    try:
        book = JobBook(RedisJobStore(store, prefix))
        request = job_codec.new_job(template(expires_ms=now_ms() + 300))
        job, _ = await book.create(request)
        await book.record(job.id, [(0, True, ok(0).SerializeToString())])
        await book.seal(job.id, 2)
        await asyncio.sleep(0.4)
        late, recorded = await book.record(job.id, [(1, True, ok(1).SerializeToString())])
    finally:
        await store.stop()
    assert recorded == 0 and late.state == JobState.EXPIRED and late.done == 1


class MemoryBroker:
    """What the submission publishes, kept in memory: the queue is not under test here."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def publish(self, queue: str, level: int, bodies: list[bytes]) -> None:
        self.bodies += bodies

    async def ready_messages(self, stage: str) -> int:
        return 0  # never full: the job queue's bound has its own tests


@pytest.fixture
async def jobs(records: JobRecords, model_repository: Path) -> Jobs:
    settings = GatewaySettings(model_repository=model_repository, job_lease_renew_s=0.2)
    router = Router(ModelRepository(model_repository), 64, 1000)
    return Jobs(router, cast(Broker, MemoryBroker()), records, settings)


async def slow_texts(pause: asyncio.Event | float) -> AsyncIterator[list[str]]:
    yield ["one text"]
    if isinstance(pause, asyncio.Event):
        await pause.wait()
    else:
        await asyncio.sleep(pause)
    yield ["another", "and a third"]


async def test_a_submission_slower_than_the_lease_is_accepted(jobs: Jobs) -> None:
    job = await jobs.submit(Submission(model="minilm-embed"), slow_texts(LEASE_S * 2))
    assert job.sealed and job.total == 3 and job.state == jobs_pb2.JOB_STATE_QUEUED


async def test_a_second_submission_with_the_key_of_one_streaming_is_refused(
    jobs: Jobs, records: JobRecords
) -> None:
    key, go_on = uuid.uuid4().hex, asyncio.Event()
    first = asyncio.create_task(
        jobs.submit(Submission(model="minilm-embed", idempotency_key=key), slow_texts(go_on))
    )
    while not [j for j in await records.list(50) if j.idempotency_key == key]:
        await asyncio.sleep(0.02)
    with pytest.raises(Conflict, match="still in progress"):
        await jobs.submit(Submission(model="minilm-embed", idempotency_key=key), slow_texts(0))
    go_on.set()
    accepted = await first
    again = await jobs.submit(Submission(model="minilm-embed", idempotency_key=key), slow_texts(0))
    assert again.id == accepted.id and again.total == 3


async def test_a_gateway_that_comes_back_after_its_lease_lapsed_finds_the_job_failed(
    records: JobRecords,
) -> None:
    job, _ = await records.create(template())
    await asyncio.sleep(LEASE_S + 0.1)  # a pause longer than the lease: its items may be lost
    renewed = await records.renew(job.id)
    assert renewed.state == jobs_pb2.JOB_STATE_FAILED and "submission stopped" in renewed.error
    sealed = await records.seal(job.id, 3)
    assert sealed.state == jobs_pb2.JOB_STATE_FAILED and not sealed.sealed


async def test_a_record_written_before_ttls_keeps_its_results(
    records: JobRecords, redis: Redis, prefix: str
) -> None:
    job, _ = await records.create(template())
    await redis.persist(f"{prefix}job:{job.id}")  # as records were before they had a TTL
    await records.record(job.id, [ok(0)])
    assert await redis.ttl(f"{prefix}job:{job.id}:results") == -1
    assert [i.index for i in (await records.results(job.id, 0, 10)).items] == [0]
