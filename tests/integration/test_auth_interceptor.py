"""The auth interceptor on a real grpc.aio server, behind the service interceptor as the gateway
runs it: each call shape is refused without a key and runs as its key's principal with one;
a key is never carried over from one call to the next; a call with two keys, or with a key
that expired while the gateway still trusted it, is refused and audited."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from fmserve.core import context as call_context
from fmserve.core.metrics import RpcMetrics
from fmserve.rpc.interceptors import ServiceInterceptor
from fmserve.v1 import gateway_pb2, gateway_pb2_grpc, jobs_pb2
from services.gateway import principal
from services.gateway.access import AccessTable
from services.gateway.auth import AuthInterceptor, _bearer
from services.gateway.keyring import KeyRing
from services.gateway.principal import AdmitAll
from tests.unit.test_gateway_auth import MemoryKeyStore


class Seen(gateway_pb2_grpc.GatewayServicer):
    """Answers at once, noting each call's principal and the metadata bound for it."""

    def __init__(self) -> None:
        self.principals: list[str] = []
        self.metadata: list[Any] = []

    def _note(self) -> None:
        caller = principal.current.get()
        self.principals.append(caller.name if caller else "")
        self.metadata.append(call_context.metadata.get())

    async def Infer(self, request: Any, context: Any) -> gateway_pb2.InferResponse:
        self._note()
        return gateway_pb2.InferResponse()

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self._note()
        yield gateway_pb2.GenerateResponse()

    async def SubmitJob(self, requests: Any, context: Any) -> jobs_pb2.Job:
        async for _ in requests:
            pass
        self._note()
        return jobs_pb2.Job(id="job")


@pytest.fixture
async def served() -> AsyncIterator[tuple[gateway_pb2_grpc.GatewayStub, Seen, MemoryKeyStore]]:
    store, seen = MemoryKeyStore(), Seen()
    table = AccessTable(lambda _: "embedding", lambda _: (16, 64))
    auth = AuthInterceptor(KeyRing(store, 60.0), table, AdmitAll())  # type: ignore[arg-type]
    server = grpc.aio.server(interceptors=[ServiceInterceptor("gateway", RpcMetrics("t")), auth])
    gateway_pb2_grpc.add_GatewayServicer_to_server(seen, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield gateway_pb2_grpc.GatewayStub(channel), seen, store
    await server.stop(None)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def call(stub: gateway_pb2_grpc.GatewayStub, shape: str, metadata: Any) -> None:
    """One call of the shape: unary, server-streaming or client-streaming."""
    if shape == "unary":
        await stub.Infer(gateway_pb2.InferRequest(model="m", texts=["x"]), metadata=metadata)
    elif shape == "server stream":
        request = gateway_pb2.GenerateRequest(model="m", prompt="hi")
        async for _ in stub.Generate(request, metadata=metadata):
            pass
    else:
        header = gateway_pb2.SubmitJobRequest(
            header=gateway_pb2.JobHeader(model="m", expected_items=1)
        )
        await stub.SubmitJob(iter([header]), metadata=metadata)


SHAPES = ["unary", "server stream", "client stream"]


@pytest.mark.parametrize("shape", SHAPES)
async def test_each_call_shape_runs_as_its_keys_principal_and_never_without_a_key(
    served: Any, shape: str
) -> None:
    stub, seen, store = served
    key = store.add("ci", ["infer:*", "jobs:submit"])
    await call(stub, shape, bearer(key))
    assert seen.principals == ["ci"]
    assert ("authorization", f"Bearer {key}") in seen.metadata[0]  # bound for the call
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(stub, shape, ())  # the same channel, right after: nothing carried over
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert seen.principals == ["ci"]
    assert call_context.metadata.get() is None  # bound in the call's task only


async def test_a_call_with_two_keys_is_refused_and_audited(
    served: Any, caplog: pytest.LogCaptureFixture
) -> None:
    stub, seen, store = served
    key = store.add("ci", ["infer:*"])
    caplog.set_level(logging.INFO, logger="fmserve.audit")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(stub, "unary", (("authorization", "Bearer nope"), *bearer(key)))
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "one `authorization` header" in (refused.value.details() or "")
    assert seen.principals == []
    assert [r.outcome for r in caplog.records if hasattr(r, "outcome")] == ["UNAUTHENTICATED"]


async def test_a_key_that_expires_while_trusted_is_refused_and_audited(
    served: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub, seen, store = served
    expires_ms = int(time.time() * 1000) + 60_000
    key = store.add("soon", ["infer:*"], expires_ms=expires_ms)
    await call(stub, "unary", bearer(key))  # verified, and trusted for the next 60 s
    monkeypatch.setattr(time, "time", lambda: expires_ms / 1000 + 1)
    caplog.set_level(logging.INFO, logger="fmserve.audit")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(stub, "unary", bearer(key))
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert seen.principals == ["soon"] and store.reads == 1  # refused from the gateway's trust
    outcomes = [r.outcome for r in caplog.records if hasattr(r, "outcome")]
    assert outcomes == ["UNAUTHENTICATED"]


def test_the_auth_interceptor_alone_refuses_to_guess_the_key() -> None:
    """Outside the service interceptor no metadata is bound: the call fails (INTERNAL, logged)
    instead of running on a key it cannot read."""
    with pytest.raises(RuntimeError, match="inside the service interceptor"):
        _bearer()
