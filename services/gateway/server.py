"""The `fmserve.v1.Gateway` servicer: wire → domain → wire (conversions in codec.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from fmserve.rpc.service import Servicer
from fmserve.v1 import gateway_pb2, gateway_pb2_grpc, jobs_pb2, keys_pb2, policy_pb2
from services.gateway import codec, principal, scopes
from services.gateway.admin import KeyAdmin
from services.gateway.gateway import Gateway
from services.gateway.generator import Generator
from services.gateway.jobs import Jobs
from services.gateway.model_versions import ModelVersions
from services.gateway.rollouts import Rollouts


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self,
        gateway: Gateway,
        jobs: Jobs,
        keys: KeyAdmin,
        generator: Generator,
        rollouts: Rollouts,
        versions: ModelVersions,
    ) -> None:
        self.gateway = gateway
        self.jobs = jobs
        self.keys = keys
        self.generator = generator
        self.rollouts = rollouts
        self.versions = versions

    async def Infer(
        self, request: gateway_pb2.InferRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.InferResponse:
        return codec.to_wire(await self.gateway.infer(codec.to_domain(request)))

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        # Closed as soon as the call ends (the client left, the deadline passed), which cancels
        # the inference stream at once rather than when the generator is collected.
        call = codec.generate_to_domain(request)
        async with contextlib.aclosing(self.generator.generate(call)) as events:
            async for event in events:
                yield codec.event_to_wire(event)

    async def ListModels(
        self, request: gateway_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListModelsResponse:
        models = [m for m in self.gateway.router.models() if _may_call(m.name, m.task.value)]
        return gateway_pb2.ListModelsResponse(models=[codec.model_to_wire(m) for m in models])

    async def SubmitJob(
        self,
        requests: AsyncIterator[gateway_pb2.SubmitJobRequest],
        context: grpc.aio.ServicerContext,
    ) -> jobs_pb2.Job:
        header = await anext(aiter(requests), None)
        submission = codec.submission_to_domain(header)
        return await self.jobs.submit(submission, codec.items_to_domain(requests))

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
        # Closed as soon as the stream ends, so a departed watcher frees its slot at once.
        async with contextlib.aclosing(self.jobs.watch(request.job_id, context.peer())) as jobs:
            async for job in jobs:
                yield job

    async def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        return await self.jobs.cancel(request.job_id)

    async def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        return jobs_pb2.ListJobsResponse(jobs=await self.jobs.list(request.limit))

    async def CreateApiKey(
        self, request: keys_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.CreateApiKeyResponse:
        return await self.keys.create(request)

    async def ListApiKeys(
        self, request: keys_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.ListApiKeysResponse:
        return keys_pb2.ListApiKeysResponse(keys=await self.keys.list())

    async def RevokeApiKey(
        self, request: keys_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.ApiKeyInfo:
        return await self.keys.revoke(request.name)

    async def SetTrafficPolicy(
        self, request: policy_pb2.SetTrafficPolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.TrafficPolicy:
        return await self.rollouts.set(request.policy)

    async def GetTrafficPolicy(
        self, request: policy_pb2.GetTrafficPolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.TrafficPolicy:
        return await self.rollouts.get(request.model)

    async def Promote(
        self, request: policy_pb2.PromoteRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.TrafficPolicy:
        return await self.rollouts.promote(request.model)

    async def Rollback(
        self, request: policy_pb2.RollbackRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.TrafficPolicy:
        return await self.rollouts.rollback(request.model)

    async def ListModelVersions(
        self, request: policy_pb2.ListModelVersionsRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.ListModelVersionsResponse:
        return policy_pb2.ListModelVersionsResponse(
            versions=await self.versions.list(request.model)
        )


def _may_call(model: str, task: str) -> bool:
    """Whether the caller's key may call the model (every model when auth is off): a key is
    shown only the models its scopes reach."""
    caller = principal.current.get()
    return caller is None or scopes.allows(caller.scopes, scopes.infer_scope(model, task))


def servicer(servicer: GatewayServicer) -> Servicer:
    """The servicer as `fmserve.rpc.service.Service` registers it."""
    name = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
    return Servicer(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer, name)
