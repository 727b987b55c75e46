"""The channels services open carry the request id on every call, whatever its shape, beside the
caller's own metadata, against a real grpc.aio server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from fmserve.core import context
from fmserve.rpc.channels import open_channel
from fmserve.rpc.interceptors import REQUEST_ID_KEY

pytestmark = pytest.mark.timeout(30)

SERVICE = "fmserve.test.Echo"


def _seen(context_: grpc.aio.ServicerContext) -> bytes:
    """The request id and the caller's own header the server received, as `rid|mine`."""
    metadata = dict(context_.invocation_metadata() or ())
    return f"{metadata.get(REQUEST_ID_KEY, '')}|{metadata.get('x-mine', '')}".encode()


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


async def _one_of_each(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> list:
    replies = [await channel.unary_unary(f"/{SERVICE}/UnaryUnary")(b"x", metadata=metadata)]
    async for reply in channel.unary_stream(f"/{SERVICE}/UnaryStream")(b"x", metadata=metadata):
        replies.append(reply)
    replies.append(
        await channel.stream_unary(f"/{SERVICE}/StreamUnary")(iter([b"x"]), metadata=metadata)
    )
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
            bare = await _one_of_each(channel, ())
    finally:
        context.request_id.reset(token)
    assert mine == [b"req-123|kept"] * 4
    assert bare == [b"req-123|"] * 4


async def test_a_call_outside_any_request_adds_no_request_id(address: str) -> None:
    async with open_channel(address) as channel:
        replies = await _one_of_each(channel, (("x-mine", "kept"),))
    assert replies == [b"|kept"] * 4
