"""WatchJob through the gateway's servicer on a real grpc.aio server, with a real cache service:
200 watchers of one job cost about one job read per interval, all see the end, the stream past
`max_watchers` is refused with RESOURCE_EXHAUSTED, and a client that cancels frees its slot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from fmserve.queue.chunks import failure
from fmserve.queue.records import JobRecords
from fmserve.rpc.service import Service
from fmserve.v1 import common_pb2, gateway_pb2_grpc, jobs_pb2
from services.gateway.jobs import Jobs
from services.gateway.server import GatewayServicer, servicer
from services.gateway.settings import GatewaySettings
from tests.integration.conftest import job_records

pytestmark = pytest.mark.timeout(60)
WATCHERS = 200
INTERVAL_S = 0.05


class CountingRecords:
    """The real job records, counting the reads WatchJob makes."""

    def __init__(self, records: JobRecords) -> None:
        self.records = records
        self.reads = 0

    async def get(self, job_id: str) -> jobs_pb2.Job:
        self.reads += 1
        return await self.records.get(job_id)


@pytest.fixture
async def records(redis_url: str, prefix: str) -> AsyncIterator[JobRecords]:
    async with job_records(redis_url, prefix) as records:
        yield records


@pytest.fixture
async def counted(records: JobRecords) -> CountingRecords:
    return CountingRecords(records)


@pytest.fixture
async def stub(counted: CountingRecords) -> AsyncIterator[gateway_pb2_grpc.GatewayStub]:
    settings = GatewaySettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        grace_period_s=0.5,
        job_watch_interval_s=INTERVAL_S,
        max_watchers=WATCHERS,
        max_watchers_per_connection=0,
    )
    jobs = Jobs(None, None, counted, settings)  # type: ignore[arg-type]  # watching needs neither
    public = GatewayServicer(None, jobs, None, None, None, None)  # type: ignore[arg-type]
    service = Service("gateway", settings, [servicer(public)])
    await service.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)
    await service.stop()


async def new_job(records: JobRecords, items: int) -> jobs_pb2.Job:
    job, _ = await records.create(
        jobs_pb2.Job(model="m", version="1", task=common_pb2.TASK_EMBEDDING, retention_s=60)
    )
    return await records.seal(job.id, items)


async def test_watchers_of_one_job_share_its_reads_and_all_see_the_end(
    records: JobRecords, counted: CountingRecords, stub: gateway_pb2_grpc.GatewayStub
) -> None:
    job = await new_job(records, 2)
    calls = [stub.WatchJob(jobs_pb2.GetJobRequest(job_id=job.id)) for _ in range(WATCHERS)]
    firsts = await asyncio.gather(*(call.read() for call in calls))
    assert {first.state for first in firsts} == {jobs_pb2.JOB_STATE_QUEUED}

    before, started = counted.reads, time.monotonic()
    await asyncio.sleep(1.0)
    per_interval = (counted.reads - before) / ((time.monotonic() - started) / INTERVAL_S)
    print(f"{WATCHERS} watchers: {per_interval:.2f} job reads per interval")
    assert per_interval <= 1.5  # was one read per watcher per interval: 200

    extra = stub.WatchJob(jobs_pb2.GetJobRequest(job_id=job.id))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await extra.read()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at most 200" in (refused.value.details() or "")

    calls.pop().cancel()  # a client that leaves frees its slot
    replacement, first = await watch_when_free(stub, job.id)
    assert first.state == jobs_pb2.JOB_STATE_QUEUED
    calls.append(replacement)

    await records.record(job.id, [failure(0, "bad"), failure(1, "bad")])
    lasts = await asyncio.gather(*(last_of(call) for call in calls))
    assert len({(last.state, last.failed) for last in lasts}) == 1
    assert lasts[0].failed == 2 and lasts[0].state not in (
        jobs_pb2.JOB_STATE_QUEUED,
        jobs_pb2.JOB_STATE_RUNNING,
    )


async def watch_when_free(
    stub: gateway_pb2_grpc.GatewayStub, job_id: str
) -> tuple[grpc.aio.UnaryStreamCall, jobs_pb2.Job]:
    """A watch started as soon as a slot is free (the server frees one as a cancel arrives)."""
    deadline = time.monotonic() + 10
    while True:
        call = stub.WatchJob(jobs_pb2.GetJobRequest(job_id=job_id))
        try:
            return call, await call.read()
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def last_of(call: grpc.aio.UnaryStreamCall) -> jobs_pb2.Job:
    last = None
    while (job := await call.read()) is not grpc.aio.EOF:
        last = job
    assert last is not None
    return last
