"""The fmserve.v1.Cache servicer: wire → ResultCache and JobBook → wire (conversions in
codec.py, and job_codec.py for job records)."""

from __future__ import annotations

import grpc

from fmserve.rpc.service import Servicer
from fmserve.v1 import cache_pb2, cache_pb2_grpc, jobs_pb2
from services.cache import codec, job_codec
from services.cache.cache import ResultCache
from services.cache.jobs import DEFAULT_PAGE, JobBook


class CacheServicer(cache_pb2_grpc.CacheServicer):
    def __init__(self, cache: ResultCache, jobs: JobBook) -> None:
        self.cache = cache
        self.jobs = jobs

    async def Lookup(
        self, request: cache_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.LookupResponse:
        values = await self.cache.lookup(list(request.keys))
        return cache_pb2.LookupResponse(
            entries=[codec.cache_entry_to_wire(value) for value in values]
        )

    async def Store(
        self, request: cache_pb2.StoreRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.StoreResponse:
        items = [codec.store_item_to_domain(item) for item in request.items]
        stored = await self.cache.store(items, request.ttl_s)
        return cache_pb2.StoreResponse(stored=stored)

    async def CreateJob(
        self, request: cache_pb2.CreateJobRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.CreateJobResponse:
        record, created = await self.jobs.create(job_codec.new_job(request.job))
        return cache_pb2.CreateJobResponse(job=job_codec.to_wire(record), created=created)

    async def RenewJobLease(
        self, request: cache_pb2.RenewJobLeaseRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        return job_codec.to_wire(await self.jobs.renew(request.job_id))

    async def SealJob(
        self, request: cache_pb2.SealJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        return job_codec.to_wire(await self.jobs.seal(request.job_id, request.total))

    async def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        return job_codec.to_wire(await self.jobs.get(request.job_id))

    async def RecordItems(
        self, request: cache_pb2.RecordItemsRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.RecordItemsResponse:
        items = [job_codec.item_to_domain(item) for item in request.items]
        record, recorded = await self.jobs.record(request.job_id, items)
        return cache_pb2.RecordItemsResponse(job=job_codec.to_wire(record), recorded=recorded)

    async def GetJobResults(
        self, request: jobs_pb2.GetJobResultsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.GetJobResultsResponse:
        record, values = await self.jobs.results(request.job_id, request.start, request.limit)
        return jobs_pb2.GetJobResultsResponse(
            job=job_codec.to_wire(record),
            items=[jobs_pb2.JobItemResult.FromString(v) for v in values],
            next_start=request.start + (request.limit or DEFAULT_PAGE),
        )

    async def FinishJob(
        self, request: cache_pb2.FinishJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        state = job_codec.state_to_domain(request.state)
        return job_codec.to_wire(await self.jobs.finish(request.job_id, state, request.error))

    async def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        records = await self.jobs.recent(request.limit, request.owner_key_id)
        return jobs_pb2.ListJobsResponse(jobs=[job_codec.to_wire(r) for r in records])


def servicer(cache: ResultCache, jobs: JobBook) -> Servicer:
    """The servicer as `fmserve.rpc.service.Service` registers it."""
    name = cache_pb2.DESCRIPTOR.services_by_name["Cache"].full_name
    return Servicer(cache_pb2_grpc.add_CacheServicer_to_server, CacheServicer(cache, jobs), name)
