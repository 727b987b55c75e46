"""The channels services open carry the request id and the trace context on every call,
whatever its shape, beside the caller's own metadata (a tuple or grpc.aio.Metadata, by name or,
for the stream-request shapes, by position), against a real grpc.aio server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from fmserve.core import context
from fmserve.rpc.channels import open_channel
from fmserve.rpc.interceptors import REQUEST_ID_KEY

pytestmark = pytest.mark.timeout(30)

SERVICE = "fmserve.test.Echo"


TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736


def _seen(context_: grpc.aio.ServicerContext) -> bytes:
    """The request id, the caller's own header and the trace id of `traceparent` that the
    server received, as `rid|mine|trace`."""
    metadata = dict(context_.invocation_metadata() or ())
    parent = metadata.get("traceparent", "")
    trace_id = parent.split("-")[1] if parent else ""
    return f"{metadata.get(REQUEST_ID_KEY, '')}|{metadata.get('x-mine', '')}|{trace_id}".encode()


async def _unary_unary(request: bytes, context_: grpc.aio.ServicerContext) -> bytes:
    return _seen(context_)


async def _unary_stream(request: bytes, context_: grpc.aio.ServicerContext) -> Any:
    yield _seen(context_)


async def _stream_unary(requests: Any, context_: grpc.aio.ServicerContext) -> bytes:
    async for _ in requests:
        pass
    return _seen(context_)


async def _stream_stream(requests: Any, context_: grpc.aio.ServicerContext) -> Any:
    async for _ in requests:
        yield _seen(context_)


@pytest.fixture
async def address() -> AsyncIterator[str]:
    server = grpc.aio.server()
    handlers = {
        "UnaryUnary": grpc.unary_unary_rpc_method_handler(_unary_unary),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(_unary_stream),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(_stream_unary),
        "StreamStream": grpc.stream_stream_rpc_method_handler(_stream_stream),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def _one_of_each(channel: grpc.aio.Channel, metadata: Any) -> list[bytes]:
    replies = [await channel.unary_unary(f"/{SERVICE}/UnaryUnary")(b"x", metadata=metadata)]
    async for reply in channel.unary_stream(f"/{SERVICE}/UnaryStream")(b"x", metadata=metadata):
        replies.append(reply)
    stream_unary = channel.stream_unary(f"/{SERVICE}/StreamUnary")
    replies.append(await stream_unary(iter([b"x"]), 5, metadata))  # by position, as it may
    call = channel.stream_stream(f"/{SERVICE}/StreamStream")(metadata=metadata)
    await call.write(b"x")
    replies.append(await call.read())
    await call.done_writing()
    return replies


async def test_every_call_shape_carries_the_request_id_beside_the_callers_metadata(
    address: str,
) -> None:
    token = context.request_id.set("req-123")
    try:
        async with open_channel(address) as channel:
            mine = await _one_of_each(channel, (("x-mine", "kept"),))
            as_metadata = await _one_of_each(channel, grpc.aio.Metadata(("x-mine", "kept")))
            bare = await _one_of_each(channel, None)
    finally:
        context.request_id.reset(token)
    assert mine == as_metadata == [b"req-123|kept|"] * 4
    assert bare == [b"req-123||"] * 4


async def test_every_call_shape_carries_the_trace_it_is_made_in(address: str) -> None:
    span = NonRecordingSpan(SpanContext(TRACE_ID, 0x00F067AA0BA902B7, False, TraceFlags(1)))
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        async with open_channel(address) as channel:
            replies = await _one_of_each(channel, (("x-mine", "kept"),))
    finally:
        otel_context.detach(token)
    assert replies == [f"|kept|{TRACE_ID:032x}".encode()] * 4


async def test_a_call_outside_any_request_adds_no_request_id(address: str) -> None:
    async with open_channel(address) as channel:
        replies = await _one_of_each(channel, (("x-mine", "kept"),))
    assert replies == [b"|kept|"] * 4
