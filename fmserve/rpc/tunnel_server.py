"""The server side of `fmserve.v1.Tunnel`: unary calls that arrive as messages on a stream
kept open (protos/fmserve/v1/tunnel.proto), each run as its own unary call would be.

A message goes through the same wrapped handler a unary call gets from the server's
interceptors (request id, trace, metrics, logs, the mapping of errors to statuses), with a
context of its own that answers what a handler asks of a call's context. Messages on one stream
run concurrently and are answered as they finish. A message's timeout cancels its handler as
gRPC cancels a unary call's at its deadline.

When the server drains, each stream answers the calls it started, refuses new ones at once
(UNAVAILABLE, marked as not run) and ends once the started ones are answered: the client sends
the refused ones again as unary calls, which the stopping server refuses too, so they go to
another replica (the channels retry UNAVAILABLE)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from fmserve.rpc.wrapping import MethodWrapper
from fmserve.v1 import tunnel_pb2, tunnel_pb2_grpc

log = logging.getLogger("fmserve.rpc.tunnel")

SERVICE = tunnel_pb2.DESCRIPTOR.services_by_name["Tunnel"].full_name
ENVELOPE_BYTES = 4096
"""Room left in a reply's message for what wraps the payload (id, status, trailers)."""
NOT_RUN_KEY = "x-fmserve-not-run"
"""In the trailing metadata of a call a draining server refused without running it."""


class HandlerRecorder:
    """Stands for the server while a generated `add_*_to_server` function adds a servicer: it
    keeps the generic handlers (the tunnel looks its methods up in them) and passes everything
    on to the server."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server
        self.handlers: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.handlers.extend(handlers)
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self._server.add_registered_method_handlers(service, handlers)


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


class MessageContext:
    """What a handler may ask of its call's context, for a call that came as a message."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], deadline: float | None) -> None:
        self._metadata = metadata
        self._deadline = deadline
        self.status: grpc.StatusCode | None = None
        self.details = ""
        self.trailing: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailing = tuple(metadata)

    def code(self) -> grpc.StatusCode | None:
        return self.status

    def set_code(self, code: grpc.StatusCode) -> None:
        self.status = code

    def set_details(self, details: str) -> None:
        self.details = details

    def peer(self) -> str:
        return "tunnel"

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.status, self.details = code, details
        raise grpc.aio.AbortError()


class TunnelServicer(tunnel_pb2_grpc.TunnelServicer):
    def __init__(
        self,
        handlers: Sequence[grpc.GenericRpcHandler],
        wrappers: Sequence[MethodWrapper],
        max_reply_bytes: int,
        max_metadata_bytes: int,
    ) -> None:
        """`handlers`: the server's own (a `HandlerRecorder`'s); `wrappers`: its interceptors,
        outermost first, as the server applies them; `max_reply_bytes` and
        `max_metadata_bytes`: the server's send limit and metadata bound, which a unary call
        would have met."""
        self._handlers = handlers
        self._wrappers = wrappers
        self.max_reply_bytes = max_reply_bytes
        self.max_metadata_bytes = max_metadata_bytes
        self._methods: dict[str, grpc.RpcMethodHandler | None] = {}
        self._streams: set[_Stream] = set()
        self.draining = False

    async def Open(
        self, requests: AsyncIterator[tunnel_pb2.TunnelRequest], context: Any
    ) -> AsyncIterator[tunnel_pb2.TunnelReply]:
        stream = _Stream(self)
        self._streams.add(stream)
        try:
            async for reply in stream.serve(requests):
                yield reply
        finally:
            self._streams.discard(stream)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    async def drain(self, grace_s: float) -> None:
        """Every stream, open or opened from now on, refuses new calls, answers what it
        started, and ends."""
        self.draining = True
        for stream in list(self._streams):
            stream.end_when_answered()

    def method(self, path: str) -> grpc.RpcMethodHandler | None:
        """The unary method at `path` wrapped as the server's interceptors wrap it; None if
        this server has no such unary method. Looked up once per path."""
        if path in self._methods:
            return self._methods[path]
        handler = next(
            (h for g in self._handlers if (h := g.service(_Details(path))) is not None), None
        )
        if handler is not None and handler.unary_unary is not None:
            name = path.rsplit("/", 1)[-1]
            for wrapper in reversed(self._wrappers):
                handler = wrapper.wrap(handler, name)
        else:
            handler = None
        self._methods[path] = handler
        return handler


class _End:
    """Put on a stream's reply queue once it has read its last request and answered all."""


class _Stream:
    """One open Tunnel call: reads requests, runs each as a task, yields replies."""

    def __init__(self, servicer: TunnelServicer) -> None:
        self._servicer = servicer
        self._replies: asyncio.Queue[tunnel_pb2.TunnelReply | _End] = asyncio.Queue()
        self._calls: dict[int, asyncio.Task[None]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def serve(
        self, requests: AsyncIterator[tunnel_pb2.TunnelRequest]
    ) -> AsyncIterator[tunnel_pb2.TunnelReply]:
        self._reader = asyncio.create_task(self._read(requests))
        self._reader.add_done_callback(lambda _: self._end_when_answered())
        try:
            while not isinstance(reply := await self._replies.get(), _End):
                yield reply
        finally:
            for task in [self._reader, *self._calls.values()]:
                task.cancel()

    def end_when_answered(self) -> None:
        """The server drains: end once the calls started are answered."""
        self._end_when_answered()

    async def _read(self, requests: AsyncIterator[tunnel_pb2.TunnelRequest]) -> None:
        async for request in requests:
            if request.cancel:
                if call := self._calls.get(request.id):
                    call.cancel()
                continue
            if self._servicer.draining:
                self._replies.put_nowait(_refused(request.id))
                continue
            task = asyncio.create_task(self._answer(request))
            self._calls[request.id] = task
            task.add_done_callback(functools.partial(self._finished, request.id))

    def _finished(self, id_: int, _: asyncio.Task[None]) -> None:
        self._calls.pop(id_, None)
        self._end_when_answered()

    def _end_when_answered(self) -> None:
        if self._calls or self._reader is None:
            return
        if self._reader.done() or self._servicer.draining:
            self._replies.put_nowait(_End())

    async def _answer(self, request: tunnel_pb2.TunnelRequest) -> None:
        try:
            reply = await self._run(request)
        except asyncio.CancelledError:
            return  # the client cancelled it, or the stream ended: nobody waits for a reply
        except Exception:  # the interceptor maps a handler's errors; this is the tunnel's own
            log.exception("a tunnelled call to %s failed", request.method)
            reply = _status(grpc.StatusCode.INTERNAL, "internal error in the service's tunnel")
        reply.id = request.id
        self._replies.put_nowait(reply)

    async def _run(self, request: tunnel_pb2.TunnelRequest) -> tunnel_pb2.TunnelReply:
        # Refused as gRPC refuses a unary call: metadata over the bound, or no such method.
        # The stream carries on with its other calls.
        size, limit = _metadata_bytes(request.metadata), self._servicer.max_metadata_bytes
        if size > limit:
            message = f"the call's metadata is {size} bytes, over this service's limit of {limit}"
            return _status(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        handler = self._servicer.method(request.method)
        if handler is None:
            return _status(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{request.method} is not a unary method of this service",
            )
        # the service interceptor's deserializer turns bytes that do not decode into a call
        # its handler refuses INVALID_ARGUMENT, as on a unary call
        message = handler.request_deserializer(request.payload)
        deadline = time.monotonic() + request.timeout_s if request.timeout_s > 0 else None
        context = MessageContext(tuple(request.metadata.items()), deadline)
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                response = await handler.unary_unary(message, context)
        except grpc.aio.AbortError:
            code = context.status or grpc.StatusCode.UNKNOWN
            return _status(code, context.details, context.trailing)
        except TimeoutError:
            return _status(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        payload = handler.response_serializer(response)
        if len(payload) > self._servicer.max_reply_bytes - ENVELOPE_BYTES:
            message = (
                f"the reply is {len(payload)} bytes, over this service's limit of "
                f"{self._servicer.max_reply_bytes}"
            )
            return _status(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        return tunnel_pb2.TunnelReply(payload=payload)


def _status(
    code: grpc.StatusCode, message: str, trailing: tuple[tuple[str, str], ...] = ()
) -> tunnel_pb2.TunnelReply:
    text = {k: v for k, v in trailing if isinstance(v, str)}  # a "-bin" key's bytes stay out
    return tunnel_pb2.TunnelReply(code=code.value[0], message=message, trailing_metadata=text)


def _metadata_bytes(metadata: Any) -> int:
    """Metadata's size as HTTP/2 counts a header list (RFC 7540 §6.5.2), gRPC's bound too."""
    return sum(len(key.encode()) + len(value.encode()) + 32 for key, value in metadata.items())


def _refused(id_: int) -> tunnel_pb2.TunnelReply:
    reply = _status(grpc.StatusCode.UNAVAILABLE, "the service is stopping", ((NOT_RUN_KEY, "1"),))
    reply.id = id_
    return reply


def _loop_time(deadline: float | None) -> float | None:
    """`deadline` (time.monotonic()) on the event loop's clock, which asyncio.timeout_at
    takes."""
    if deadline is None:
        return None
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())
