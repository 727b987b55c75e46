"""Job records: the cache service in-process against the real Redis (database 14, a key prefix
of its own), called through fmserve.queue.records.JobRecords, the client the gateway and
stages use."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from fmserve.core import context
from fmserve.core.jobs import JobState
from fmserve.errors import Conflict, DeadlineExceeded, InvalidInput, JobNotFound
from fmserve.queue.records import JobRecords
from fmserve.v1 import common_pb2, jobs_pb2
from tests.integration.conftest import job_records

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
async def records(redis_url: str, prefix: str, redis: Redis) -> AsyncIterator[JobRecords]:
    async with job_records(redis_url, prefix) as records:
        yield records


def template(key: str = "", retention_s: int = 60, expires_ms: int = 0) -> jobs_pb2.Job:
    return jobs_pb2.Job(
        model="minilm-embed",
        version="1",
        task=common_pb2.TASK_EMBEDDING,
        retention_s=retention_s,
        idempotency_key=key,
        expires_unix_ms=expires_ms,
    )


def now_ms() -> int:
    return int(time.time() * 1000)


def ok(index: int, value: float = 1.0) -> jobs_pb2.JobItemResult:
    result = common_pb2.Result(embedding=common_pb2.Embedding(values=[value]))
    return jobs_pb2.JobItemResult(index=index, result=result)


def bad(index: int) -> jobs_pb2.JobItemResult:
    return jobs_pb2.JobItemResult(index=index, error=f"item {index} is bad")


async def test_a_new_job_is_queued_unsealed_and_listed(records: JobRecords) -> None:
    job, created = await records.create(template())
    assert created and len(job.id) == 32
    assert job.state == jobs_pb2.JOB_STATE_QUEUED
    assert (job.sealed, job.total, job.done, job.failed) == (False, 0, 0, 0)
    assert job.created_unix_ms > 0 and job.model == "minilm-embed"
    assert job.id in [j.id for j in await records.list(10)]


async def test_unknown_job_is_not_found_never_queued(records: JobRecords) -> None:
    for call in (
        records.get("nope"),
        records.record("nope", [ok(0)]),
        records.seal("nope", 3),
        records.finish("nope", JobState.CANCELLED, "x"),
        records.results("nope", 0, 10),
    ):
        with pytest.raises(JobNotFound, match="no job 'nope'"):
            await call


async def test_recording_is_idempotent_and_completion_atomic(records: JobRecords) -> None:
    job, _ = await records.create(template())
    assert await records.record(job.id, [ok(0), ok(1)]) == 2
    assert await records.record(job.id, [ok(1, 9.0), bad(2)]) == 1  # 1 again: not counted
    running = await records.get(job.id)
    assert running.state == jobs_pb2.JOB_STATE_RUNNING and running.started_unix_ms > 0
    assert (running.done, running.failed) == (2, 1)
    sealed = await records.seal(job.id, 4)
    assert sealed.state == jobs_pb2.JOB_STATE_RUNNING
    # Many concurrent recorders of the last item (redeliveries): one completes, counts once.
    await asyncio.gather(*(records.record(job.id, [ok(3)]) for _ in range(8)))
    final = await records.get(job.id)
    assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert (final.total, final.done, final.failed) == (4, 3, 1)
    page = await records.results(job.id, 0, 10)
    assert [i.index for i in page.items] == [0, 1, 2, 3]
    assert page.items[1].result.embedding.values == [1.0]  # the first answer stays
    assert page.items[2].error == "item 2 is bad"


async def test_sealing_after_every_item_completes_the_job(records: JobRecords) -> None:
    job, _ = await records.create(template())
    await records.record(job.id, [bad(0), bad(1)])
    done = await records.seal(job.id, 2)
    assert done.state == jobs_pb2.JOB_STATE_FAILED  # the documented rule: every item failed
    assert "every item failed" in done.error


async def test_a_terminal_state_never_changes(records: JobRecords) -> None:
    job, _ = await records.create(template())
    await records.record(job.id, [ok(0)])
    cancelled = await records.finish(job.id, JobState.CANCELLED, "cancelled")
    assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED
    with pytest.raises(Conflict, match="already ended"):
        await records.finish(job.id, JobState.FAILED, "x")
    assert await records.record(job.id, [ok(1)]) == 0  # items of a terminal job are ignored
    sealed = await records.seal(job.id, 2)
    assert (sealed.state, sealed.done, sealed.sealed) == (jobs_pb2.JOB_STATE_CANCELLED, 1, False)


async def test_same_idempotency_key_gives_the_same_job(records: JobRecords) -> None:
    key = uuid.uuid4().hex
    first, created = await records.create(template(key))
    await records.seal(first.id, 3)  # accepted: the key now answers with this job
    again, created_again = await records.create(template(key))
    assert (created, created_again) == (True, False)
    assert again.id == first.id and again.idempotency_key == key


async def test_a_broken_off_submission_does_not_hold_its_key(records: JobRecords) -> None:
    key = uuid.uuid4().hex
    first, _ = await records.create(template(key))
    await records.finish(first.id, JobState.FAILED, "submission interrupted")
    second, created = await records.create(template(key))
    assert created and second.id != first.id


async def test_a_job_past_its_deadline_is_expired(records: JobRecords) -> None:
    job, _ = await records.create(template(expires_ms=int(time.time() * 1000) + 200))
    assert (await records.get(job.id)).state == jobs_pb2.JOB_STATE_QUEUED
    await asyncio.sleep(0.3)
    expired = await records.get(job.id)
    assert expired.state == jobs_pb2.JOB_STATE_EXPIRED
    assert "timeout" in expired.error


async def test_retention_applies_from_the_end_of_the_job(
    records: JobRecords, redis: Redis, prefix: str
) -> None:
    deadline_s = 600
    job, _ = await records.create(template(retention_s=1, expires_ms=now_ms() + deadline_s * 1000))
    key = f"{prefix}job:{job.id}"
    # From creation: kept to its deadline and retention (and a margin), never forever.
    assert deadline_s + 1 <= await redis.ttl(key) <= deadline_s + 1 + 61
    await records.record(job.id, [ok(0)])
    assert deadline_s <= await redis.ttl(f"{key}:results") <= deadline_s + 1 + 61
    await records.seal(job.id, 1)
    assert 0 < await redis.ttl(key) <= 1
    await asyncio.sleep(1.2)
    with pytest.raises(JobNotFound):
        await records.get(job.id)


async def test_bad_requests_are_refused(records: JobRecords) -> None:
    with pytest.raises(InvalidInput, match="retention_s"):
        await records.create(template(retention_s=0))
    job, _ = await records.create(template())
    with pytest.raises(InvalidInput, match="at least one item"):
        await records.seal(job.id, 0)
    with pytest.raises(InvalidInput, match="limit"):
        await records.results(job.id, 0, 100_000)


async def test_calls_end_with_the_callers_deadline() -> None:
    # A cache service that accepted the connection and never answers: the call must give up
    # when the caller's deadline (the gateway's client's) runs out, not after its own timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        records = JobRecords(f"127.0.0.1:{silent.getsockname()[1]}")
        await records.start()
        token = context.deadline.set(time.monotonic() + 0.3)
        started = time.monotonic()
        try:
            with pytest.raises(DeadlineExceeded, match="deadline expired"):
                await records.get("0" * 32)
        finally:
            context.deadline.reset(token)
            await records.stop()
    assert time.monotonic() - started < 2.0
