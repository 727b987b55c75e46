"""The `fmserve.v1.Gateway` servicer: wire → domain → wire."""

from __future__ import annotations

import grpc

from fmserve.repository import ModelConfig, TaskName
from fmserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.gateway import Answer, CachePolicy, Gateway, InferCall
from services.gateway.stages import TASK_TO_WIRE

TASK_FROM_WIRE = {wire: task for task, wire in TASK_TO_WIRE.items()}
POLICY_FROM_WIRE = {
    common_pb2.CACHE_POLICY_USE: CachePolicy.USE,
    common_pb2.CACHE_POLICY_BYPASS: CachePolicy.BYPASS,
    common_pb2.CACHE_POLICY_REFRESH: CachePolicy.REFRESH,
}


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

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
