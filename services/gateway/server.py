"""The `fmserve.v1.Gateway` servicer: wire → domain → wire."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from fmserve.core import tracing
from fmserve.core.repository import ModelConfig
from fmserve.core.tasks import TASK_FROM_WIRE, TASK_TO_WIRE, TaskName
from fmserve.errors import InvalidInput
from fmserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, jobs_pb2
from services.gateway.gateway import Answer, CachePolicy, Gateway, InferCall
from services.gateway.jobs import Jobs, Submission

POLICY_FROM_WIRE = {
    common_pb2.CACHE_POLICY_USE: CachePolicy.USE,
    common_pb2.CACHE_POLICY_BYPASS: CachePolicy.BYPASS,
    common_pb2.CACHE_POLICY_REFRESH: CachePolicy.REFRESH,
}


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, gateway: Gateway, jobs: Jobs) -> None:
        self.gateway = gateway
        self.jobs = jobs

    async def Infer(
        self, request: gateway_pb2.InferRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.InferResponse:
        return to_wire(await self.gateway.infer(to_domain(request)))

    async def ListModels(
        self, request: gateway_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListModelsResponse:
        return gateway_pb2.ListModelsResponse(
            models=[model_info(m) for m in self.gateway.router.models()]
        )

    async def SubmitJob(
        self,
        requests: AsyncIterator[gateway_pb2.SubmitJobRequest],
        context: grpc.aio.ServicerContext,
    ) -> jobs_pb2.Job:
        header = await anext(aiter(requests), None)
        return await self.jobs.submit(submission_to_domain(header), texts_of(requests))

    async def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        return await self.jobs.get(request.job_id)

    async def GetJobResults(
        self, request: jobs_pb2.GetJobResultsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.GetJobResultsResponse:
        return await self.jobs.results(request.job_id, request.start, request.limit)

    async def WatchJob(
        self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.Job]:
        async for job in self.jobs.watch(request.job_id):
            yield job

    async def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        return await self.jobs.cancel(request.job_id)

    async def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        return jobs_pb2.ListJobsResponse(jobs=await self.jobs.list(request.limit))


def submission_to_domain(request: gateway_pb2.SubmitJobRequest | None) -> Submission:
    if request is None or not request.HasField("header"):
        raise InvalidInput("the first SubmitJob message must carry the header (model, ...)")
    h = request.header
    return Submission(
        model=h.model,
        version=h.version,
        task=TASK_FROM_WIRE.get(h.task),
        truncate=h.options.truncate,
        top_k=h.options.top_k,
        idempotency_key=h.idempotency_key,
        priority=h.priority,
        retention_s=h.retention_s,
        timeout_s=h.timeout_s,
    )


async def texts_of(
    requests: AsyncIterator[gateway_pb2.SubmitJobRequest],
) -> AsyncIterator[list[str]]:
    async for request in requests:
        if request.HasField("header"):
            raise InvalidInput("only the first SubmitJob message may carry a header")
        yield list(request.items.texts)


def to_domain(request: gateway_pb2.InferRequest) -> InferCall:
    options = request.options
    return InferCall(
        model=request.model,
        version=request.version,
        task=TASK_FROM_WIRE.get(request.task),
        texts=list(request.texts),
        truncate=options.truncate,
        top_k=options.top_k,
        cache_policy=POLICY_FROM_WIRE.get(options.cache_policy, CachePolicy.USE),
    )


def to_wire(answer: Answer) -> gateway_pb2.InferResponse:
    route = answer.route
    return gateway_pb2.InferResponse(
        model=route.model,
        version=route.version,
        task=TASK_TO_WIRE[route.task],
        results=answer.results,
        cache_hit=answer.cache_hit,
        trace_id=tracing.current_trace_id(),
    )


def model_info(config: ModelConfig) -> gateway_pb2.ModelInfo:
    versions = sorted(config.versions, key=lambda v: v != config.default_version)
    return gateway_pb2.ModelInfo(
        name=config.name,
        task=TASK_TO_WIRE[config.task],
        versions=versions,
        max_length=config.max_length,
        labels=config.labels if config.task is not TaskName.EMBEDDING else (),
        dimensions=config.dimensions,
        description=config.description,
    )
