"""What every service shows generic gRPC tooling, on a real server (the inference service, whose
protocol has the most methods fmserve leaves out): reflection under both v1alpha and v1, and
UNIMPLEMENTED (never INTERNAL, never an ERROR log line) for the methods it does not offer."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2
from prometheus_client import REGISTRY
from tritonclient.grpc import service_pb2, service_pb2_grpc

from fmserve.errors import ERROR_TYPE_KEY
from fmserve.rpc.service import Service
from services.inference.__main__ import build
from services.inference.settings import InferenceSettings

pytestmark = pytest.mark.timeout(60)

Request = reflection_pb2.ServerReflectionRequest
Response = reflection_pb2.ServerReflectionResponse
# v1 and v1alpha differ in their package name only: the same message classes read both.
REFLECTION = {
    "v1alpha": "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "v1": "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
}


@pytest.fixture(scope="module")
async def service(model_repository: Path) -> AsyncIterator[Service]:
    settings = InferenceSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        grace_period_s=1.0,
        model_repository=model_repository,
        preload_models="",
        worker_enabled=False,
    )
    service = build(settings)
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
async def channel(service: Service) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        yield channel


async def reflect(channel: grpc.aio.Channel, version: str, request: Request) -> Response:
    call = channel.stream_stream(
        REFLECTION[version],
        request_serializer=Request.SerializeToString,
        response_deserializer=Response.FromString,
    )
    replies = [reply async for reply in call(iter([request]), timeout=5)]
    assert len(replies) == 1
    return replies[0]


@pytest.mark.parametrize("version", ["v1alpha", "v1"])
async def test_reflection_lists_every_service_in_both_versions(
    channel: grpc.aio.Channel, version: str
) -> None:
    reply = await reflect(channel, version, Request(list_services=""))
    names = {s.name for s in reply.list_services_response.service}
    assert names == {
        "inference.GRPCInferenceService",
        "fmserve.v1.Tunnel",  # the gateway's calls, as messages on streams kept open
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }


@pytest.mark.parametrize("version", ["v1alpha", "v1"])
async def test_reflection_describes_the_services_methods(
    channel: grpc.aio.Channel, version: str
) -> None:
    request = Request(file_containing_symbol="inference.GRPCInferenceService")
    reply = await reflect(channel, version, request)
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]
    methods = {m.name for f in files for s in f.service for m in s.method}
    assert {"ModelInfer", "ModelMetadata", "ModelConfig", "ServerLive"} <= methods


async def test_reflection_v1_describes_itself(channel: grpc.aio.Channel) -> None:
    request = Request(file_containing_symbol="grpc.reflection.v1.ServerReflection")
    reply = await reflect(channel, "v1", request)
    (raw,) = reply.file_descriptor_response.file_descriptor_proto
    file = descriptor_pb2.FileDescriptorProto.FromString(raw)
    assert file.package == "grpc.reflection.v1"
    assert file.service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"


UNARY_LEFT_OUT = {
    "SystemSharedMemoryStatus": service_pb2.SystemSharedMemoryStatusRequest(),
    "SystemSharedMemoryRegister": service_pb2.SystemSharedMemoryRegisterRequest(name="r"),
    "SystemSharedMemoryUnregister": service_pb2.SystemSharedMemoryUnregisterRequest(),
    "CudaSharedMemoryStatus": service_pb2.CudaSharedMemoryStatusRequest(),
    "CudaSharedMemoryRegister": service_pb2.CudaSharedMemoryRegisterRequest(name="r"),
    "CudaSharedMemoryUnregister": service_pb2.CudaSharedMemoryUnregisterRequest(),
    "TraceSetting": service_pb2.TraceSettingRequest(),
    "LogSettings": service_pb2.LogSettingsRequest(),
}


@pytest.mark.parametrize("method", sorted(UNARY_LEFT_OUT))
async def test_a_method_fmserve_leaves_out_answers_unimplemented_quietly(
    channel: grpc.aio.Channel, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    with caplog.at_level(logging.INFO), pytest.raises(grpc.aio.AioRpcError) as raised:
        await getattr(stub, method)(UNARY_LEFT_OUT[method], timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert method in (raised.value.details() or "")
    assert dict(raised.value.trailing_metadata() or ())[ERROR_TYPE_KEY] == "Unimplemented"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_the_stream_answers_a_request_for_no_model_in_stream_quietly(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    # ModelStreamInfer (text generation) is implemented: a request's error is one in-stream
    # reply, the call itself ends OK, and nothing is logged as a server fault.
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    with caplog.at_level(logging.INFO):
        call = stub.ModelStreamInfer(iter([service_pb2.ModelInferRequest(model_name="m")]))
        replies = [reply async for reply in call]
    assert [r.error_message.split(":")[0] for r in replies] == ["NOT_FOUND"]
    assert await call.code() == grpc.StatusCode.OK
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# --- names a client makes up ----------------------------------------------------------------


def requests_counted(model: str, code: str) -> float:
    labels = {"method": "ModelMetadata", "model": model, "code": code}
    return REGISTRY.get_sample_value("fmserve_inference_requests_total", labels) or 0.0


async def test_made_up_model_names_share_one_metrics_label(channel: grpc.aio.Channel) -> None:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    before = requests_counted("unknown", "NOT_FOUND")
    for i in range(20):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=f"typo-{i}"), timeout=5)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert requests_counted("unknown", "NOT_FOUND") - before == 20
    assert requests_counted("typo-0", "NOT_FOUND") == 0


async def test_a_known_model_keeps_its_label(channel: grpc.aio.Channel) -> None:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    await stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="minilm-embed"), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError):
        request = service_pb2.ModelMetadataRequest(name="minilm-embed", version="99")
        await stub.ModelMetadata(request, timeout=5)
    assert requests_counted("minilm-embed", "OK") >= 1
    assert requests_counted("minilm-embed", "NOT_FOUND") >= 1


@pytest.mark.parametrize("name", ["m" * 256, "../etc", "a/b", ".hidden", "x" * 100_000])
async def test_a_name_no_model_can_have_is_invalid_argument(
    channel: grpc.aio.Channel, name: str
) -> None:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=name), timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = raised.value.details() or ""
    assert "model name" in details
    assert len(details) < 200  # the name is not echoed whole
