"""Server-side cross-cutting behaviour, applied to every method of every service:
request ids, metrics, access logs, and the one place where errors become gRPC statuses.

A method a servicer leaves to its generated base class (Triton's shared-memory, trace and log
RPCs, say) raises NotImplementedError there: it answers UNIMPLEMENTED, logged quietly, never
INTERNAL with a traceback."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from fmserve.core import context, tracing
from fmserve.core.metrics import RpcMetrics
from fmserve.errors import ERROR_TYPE_KEY, FmserveError, InvalidInput, Unimplemented
from fmserve.rpc.wrapping import MethodWrapper

log = logging.getLogger("fmserve.rpc")

REQUEST_ID_KEY = "x-request-id"
# Set by gRPC's retry policy on every attempt after the first (gRFC A6).
PREVIOUS_ATTEMPTS_KEY = "grpc-previous-rpc-attempts"
# Set by the tunnel's client on a call it sends again as a unary call, after its stream broke
# under it (gRPC keeps the `grpc-` prefix to itself).
RESENT_KEY = "x-fmserve-resent"


class ServiceInterceptor(MethodWrapper):
    """Wraps every method's handler with request id, metrics, logs and errors."""

    def __init__(self, service: str, metrics: RpcMetrics) -> None:
        super().__init__()
        self.service = service
        self.metrics = metrics

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        deserialize = _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method),
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method),
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_client_stream(handler.stream_unary, method),
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_bidi_stream(handler.stream_stream, method),
            request_deserializer=deserialize,
            response_serializer=handler.response_serializer,
        )

    def _wrap_unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with _CallScope(self, method, request, context) as scope:
                return await scope.run(behavior, request)

        return wrapped

    def _wrap_stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with _CallScope(self, method, request, context) as scope:
                async for reply in scope.iterate(behavior, request):
                    yield reply

        return wrapped

    def _wrap_client_stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapped(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            with _CallScope(self, method, None, context) as scope:
                return await scope.run(behavior, _checked(requests))

        return wrapped

    def _wrap_bidi_stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapped(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            with _CallScope(self, method, None, context) as scope:
                async for reply in scope.iterate(behavior, _checked(requests)):
                    yield reply

        return wrapped


async def _checked(requests: Any) -> Any:
    """A client stream's messages, each checked as it arrives."""
    async for request in requests:
        _check_decoded(request)
        yield request


@dataclass
class _Undecodable:
    """A request whose bytes did not parse; the call then fails with INVALID_ARGUMENT."""

    message_type: str


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """grpcio answers a request that fails to parse with UNKNOWN; catch it to say what it is."""
    if deserialize is None:
        return None
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    message_type = descriptor.full_name if descriptor is not None else "request"

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError:
            return _Undecodable(message_type)

    return parse


def _check_decoded(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidInput(
            f"the request is not a valid {request.message_type} message; "
            "build it with the stubs generated from protos/"
        )


# Where a request names its model: fmserve's messages, v2 inference, v2 model metadata/config.
_MODEL_FIELDS = ("model", "model_name", "name")


def _model_of(request: Any) -> str:
    return next((str(v) for f in _MODEL_FIELDS if (v := getattr(request, f, ""))), "")


class _CallScope:
    """One call: binds its request id, continues the caller's trace, times it, and maps its
    exception to a status."""

    def __init__(self, owner: ServiceInterceptor, method: str, request: Any, context: Any) -> None:
        self.metrics, self.method, self.context = owner.metrics, method, context
        self.span_name = f"{owner.service}/{method}"
        self.model = _model_of(request)
        self.code = "OK"

    def __enter__(self) -> _CallScope:
        metadata = tuple(self.context.invocation_metadata() or ())
        self.metadata_token = context.metadata.set(metadata)  # for the layers inside this one
        incoming = dict(metadata)
        self.request_id = incoming.get(REQUEST_ID_KEY) or uuid.uuid4().hex
        if incoming.get(PREVIOUS_ATTEMPTS_KEY) or incoming.get(RESENT_KEY):
            self.metrics.observe_retry(self.method)
        self.token = context.request_id.set(self.request_id)
        context.set_deadline_from(self.context.time_remaining())
        self.tracing = tracing.server_span(self.span_name, incoming)
        self.span = self.tracing.__enter__()
        self.span.set_attribute("fmserve.request_id", self.request_id)
        self.started = time.perf_counter()
        self.metrics.started(self.method)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.code == "OK" and self._deadline_passed():
            self.code = "DEADLINE_EXCEEDED"  # answered, but too late: the caller saw this
        elapsed = time.perf_counter() - self.started
        self.metrics.ended(self.method)
        self.metrics.observe(self.method, self.model, self.code, elapsed)
        log.debug("rpc", extra={"method": self.method, "code": self.code, "ms": elapsed * 1e3})
        self.span.set_attribute("rpc.grpc.status_code", self.code)
        self.tracing.__exit__(None, None, None)
        context.metadata.reset(self.metadata_token)
        context.request_id.reset(self.token)

    async def run(self, behavior: Callable[..., Awaitable[Any]], request: Any) -> Any:
        try:
            _check_decoded(request)
            return await behavior(request, self.context)
        except asyncio.CancelledError:
            self.code = self._why_cancelled()
            raise
        except Exception as exc:  # every failure reaches the wire here, and only here
            await self._abort(exc)

    async def iterate(self, behavior: Callable[..., Any], request: Any) -> Any:
        try:
            _check_decoded(request)
            async for reply in behavior(request, self.context):
                yield reply
        except asyncio.CancelledError:
            self.code = self._why_cancelled()
            raise
        except Exception as exc:
            await self._abort(exc)

    def _why_cancelled(self) -> str:
        """gRPC cancels a handler when its caller goes away or its deadline passes."""
        return "DEADLINE_EXCEEDED" if self._deadline_passed() else "CANCELLED"

    def _deadline_passed(self) -> bool:
        left = self.context.time_remaining()
        return left is not None and left <= 0

    async def _abort(self, exc: Exception) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            self.code = (self.context.code() or grpc.StatusCode.UNKNOWN).name
            raise exc
        if isinstance(exc, NotImplementedError):
            log.info("%s is not implemented", self.method)
            exc = Unimplemented(f"{self.method} is not implemented by this fmserve service")
        trailing = [(REQUEST_ID_KEY, self.request_id)]
        if isinstance(exc, FmserveError) and type(exc) is not FmserveError:
            code, message = exc.code, exc.message
            trailing += [(ERROR_TYPE_KEY, type(exc).__name__), *exc.trailing]
        else:
            log.exception("unexpected error in %s", self.method)
            code = grpc.StatusCode.INTERNAL
            message = f"internal error; quote request id {self.request_id} when reporting it"
        self.code = code.name
        tracing.mark_failed(self.span, exc)
        self.context.set_trailing_metadata(tuple(trailing))
        await self.context.abort(code, message)
