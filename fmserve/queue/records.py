"""The cache service's job records as the job path uses them: the one boundary that sees those
calls' gRPC errors, and a short-lived cache of which jobs are still wanted."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import grpc

from fmserve.core.context import remaining_s
from fmserve.core.jobs import ACTIVE, JobState, state_from_wire, state_to_wire
from fmserve.errors import (
    DeadlineExceeded,
    FmserveError,
    JobNotFound,
    NotFound,
    Unavailable,
    from_rpc_error,
)
from fmserve.rpc.channels import open_channel
from fmserve.v1 import cache_pb2, cache_pb2_grpc, jobs_pb2

CALL_TIMEOUT_S = 10.0


class JobRecords:
    """The cache service's job RPCs. Failures leave as fmserve errors: NOT_FOUND as
    JobNotFound, UNAVAILABLE (and a timeout) as Unavailable."""

    def __init__(self, address: str, max_message_bytes: int = 64 * 1024 * 1024) -> None:
        self.address = address
        self.max_message_bytes = max_message_bytes
        self._channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        self._channel = open_channel(self.address, self.max_message_bytes)
        self._stub = cache_pb2_grpc.CacheStub(self._channel)

    async def stop(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def create(self, job: jobs_pb2.Job) -> tuple[jobs_pb2.Job, bool]:
        reply = await self._call("CreateJob", cache_pb2.CreateJobRequest(job=job))
        return reply.job, reply.created

    async def renew(self, job_id: str) -> jobs_pb2.Job:
        """Keep a submission's lease: the job is FAILED if its lease lapses before it is sealed."""
        return await self._call("RenewJobLease", cache_pb2.RenewJobLeaseRequest(job_id=job_id))

    async def seal(self, job_id: str, total: int) -> jobs_pb2.Job:
        return await self._call("SealJob", cache_pb2.SealJobRequest(job_id=job_id, total=total))

    async def get(self, job_id: str) -> jobs_pb2.Job:
        return await self._call("GetJob", jobs_pb2.GetJobRequest(job_id=job_id))

    async def record(self, job_id: str, items: Sequence[jobs_pb2.JobItemResult]) -> int:
        request = cache_pb2.RecordItemsRequest(job_id=job_id, items=items)
        return int((await self._call("RecordItems", request)).recorded)

    async def results(self, job_id: str, start: int, limit: int) -> jobs_pb2.GetJobResultsResponse:
        request = jobs_pb2.GetJobResultsRequest(job_id=job_id, start=start, limit=limit)
        return await self._call("GetJobResults", request)

    async def finish(self, job_id: str, state: JobState, error: str) -> jobs_pb2.Job:
        wire = state_to_wire(state)
        request = cache_pb2.FinishJobRequest(job_id=job_id, state=wire, error=error)
        return await self._call("FinishJob", request)

    async def list(self, limit: int, owner_key_id: str = "") -> list[jobs_pb2.Job]:
        request = jobs_pb2.ListJobsRequest(limit=limit, owner_key_id=owner_key_id)
        reply = await self._call("ListJobs", request)
        return list(reply.jobs)

    async def _call(self, method: str, request: object) -> Any:
        # What is left of the caller's deadline (the gateway's SubmitJob, GetJob...), at most
        # CALL_TIMEOUT_S; stage workers have no caller, so theirs is CALL_TIMEOUT_S.
        timeout = remaining_s(CALL_TIMEOUT_S)
        try:
            return await getattr(self._stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, callers_deadline=timeout < CALL_TIMEOUT_S) from None


def _translate(exc: grpc.aio.AioRpcError, callers_deadline: bool = False) -> FmserveError:
    code = exc.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and callers_deadline:
        return DeadlineExceeded("the deadline expired while waiting for the job records")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable("the cache service (job records) is unavailable; retry shortly")
    error = from_rpc_error(exc)
    return JobNotFound(error.message) if isinstance(error, NotFound) else error


class JobStates:
    """Whether a job's items are still wanted, asked of the cache service at most once per
    `ttl_s` per job, so a stage checks every chunk without a call per chunk."""

    def __init__(self, records: JobRecords, ttl_s: float = 1.0, max_jobs: int = 10_000) -> None:
        self.records = records
        self.ttl_s = ttl_s
        self.max_jobs = max_jobs
        self._seen: dict[str, tuple[float, bool]] = {}

    async def active(self, job_id: str) -> bool:
        now = time.monotonic()
        seen = self._seen.get(job_id)
        if seen is not None and now - seen[0] < self.ttl_s:
            return seen[1]
        try:
            job = await self.records.get(job_id)
            active = state_from_wire(job.state) in ACTIVE
        except JobNotFound:
            active = False
        if len(self._seen) >= self.max_jobs:
            self._seen.clear()  # a crude bound; the next looks cost one call per job
        self._seen[job_id] = (now, active)
        return active
