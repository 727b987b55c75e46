"""The `inference.GRPCInferenceService` servicer (KServe v2 / Triton protocol): wire → registry
or instance → wire (conversions in codec/). Methods not listed here answer UNIMPLEMENTED (the
generated base class)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from fmserve.rpc.service import Servicer
from services.inference import codec
from services.inference.registry import ModelRegistry
from services.inference.streaming import StreamCall

Context: TypeAlias = grpc.aio.ServicerContext


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    async def ServerLive(
        self, request: service_pb2.ServerLiveRequest, context: Context
    ) -> service_pb2.ServerLiveResponse:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: service_pb2.ServerReadyRequest, context: Context
    ) -> service_pb2.ServerReadyResponse:
        return service_pb2.ServerReadyResponse(ready=self.registry.ready)

    async def ServerMetadata(
        self, request: service_pb2.ServerMetadataRequest, context: Context
    ) -> service_pb2.ServerMetadataResponse:
        return codec.server_metadata()

    async def ModelReady(
        self, request: service_pb2.ModelReadyRequest, context: Context
    ) -> service_pb2.ModelReadyResponse:
        ready = self.registry.is_ready(request.name, request.version)
        return service_pb2.ModelReadyResponse(ready=ready)

    async def ModelMetadata(
        self, request: service_pb2.ModelMetadataRequest, context: Context
    ) -> service_pb2.ModelMetadataResponse:
        config = self.registry.config(request.name)
        return codec.metadata_to_wire(config, config.resolve_version(request.version))

    async def ModelConfig(
        self, request: service_pb2.ModelConfigRequest, context: Context
    ) -> service_pb2.ModelConfigResponse:
        config = self.registry.config(request.name)
        return codec.config_to_wire(config, config.resolve_version(request.version))

    async def ModelStatistics(
        self, request: service_pb2.ModelStatisticsRequest, context: Context
    ) -> service_pb2.ModelStatisticsResponse:
        records = self.registry.statistics(request.name, request.version)
        return codec.statistics_to_wire(records)

    async def ModelInfer(
        self, request: service_pb2.ModelInferRequest, context: Context
    ) -> service_pb2.ModelInferResponse:
        infer = codec.to_domain(request)
        instance = await self.registry.instance(infer.model, infer.version)
        return codec.to_wire(request, instance.version, await instance.infer(infer))

    async def ModelStreamInfer(
        self, requests: AsyncIterator[service_pb2.ModelInferRequest], context: Context
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        async for response in StreamCall(self.registry).serve(requests):
            yield response

    async def RepositoryIndex(
        self, request: service_pb2.RepositoryIndexRequest, context: Context
    ) -> service_pb2.RepositoryIndexResponse:
        return codec.index_to_wire(self.registry.index(), ready_only=request.ready)

    async def RepositoryModelLoad(
        self, request: service_pb2.RepositoryModelLoadRequest, context: Context
    ) -> service_pb2.RepositoryModelLoadResponse:
        load = codec.load_to_domain(request)
        await self.registry.load(request.model_name, load.version, pin=load.pin)
        return service_pb2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: service_pb2.RepositoryModelUnloadRequest, context: Context
    ) -> service_pb2.RepositoryModelUnloadResponse:
        version = codec.unload_to_domain(request)
        await self.registry.unload(request.model_name, version)
        return service_pb2.RepositoryModelUnloadResponse()


def servicer(registry: ModelRegistry) -> Servicer:
    """The servicer as `fmserve.rpc.service.Service` registers it."""
    name = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
    return Servicer(
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
        InferenceServicer(registry),
        name,
    )
