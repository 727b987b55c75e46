"""The server interceptor (fmserve/rpc/interceptors.py): request ids, the caller's deadline, and
the one place where errors become gRPC statuses.

An interceptor only shows what it does on a real call, so these tests run a grpc.aio server on a
free loopback port with a tiny generic service (no generated stubs, no fmserve service). The
handler's behaviour is chosen by the request's first text; metrics go to an in-memory recorder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from fmserve import errors
from fmserve.core import context
from fmserve.errors import ERROR_TYPE_KEY, FmserveError
from fmserve.rpc.interceptors import REQUEST_ID_KEY, ServiceInterceptor
from fmserve.v1.preprocess_pb2 import TokenizeRequest

pytestmark = pytest.mark.timeout(10)

SERVICE = "test.Probe"
INTERNAL_TEXT = re.compile(r"internal error; quote request id (\w+) when reporting it")
SECRET = "redis://admin:hunter2@10.0.0.7 refused"


@dataclass
class Probe:
    """What the handlers saw, and what the interceptor told the metrics."""

    request_ids: list[str] = field(default_factory=list)
    deadlines_left: list[float | None] = field(default_factory=list)
    observed: list[tuple[str, str, str]] = field(default_factory=list)
    """(method, model, code) per call, as RpcMetrics.observe is told."""
    in_flight: dict[str, int] = field(default_factory=dict)
    """Calls started and not yet ended, per method, as RpcMetrics.started/ended are told."""

    def started(self, method: str) -> None:
        self.in_flight[method] = self.in_flight.get(method, 0) + 1

    def ended(self, method: str) -> None:
        self.in_flight[method] -= 1

    def observe(self, method: str, model: str, code: str, seconds: float) -> None:
        self.observed.append((method, model, code))

    def observe_retry(self, method: str) -> None:
        pass

    async def observations(self, count: int) -> list[tuple[str, str, str]]:
        """The observations once there are `count`: a failed call's status goes out as the
        handler aborts, so the client may hear of it just before the metrics do."""
        deadline = time.monotonic() + 2.0
        while len(self.observed) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return self.observed

    def see(self) -> None:
        self.request_ids.append(context.request_id.get())
        until = context.deadline.get()
        self.deadlines_left.append(None if until is None else until - time.monotonic())


async def act(probe: Probe, request: TokenizeRequest, ctx: grpc.aio.ServicerContext) -> None:
    """Do what the request's first text says: `ok`, `raise <ErrorClass>`, `crash`, `abort`,
    `hang`, `limit <ms>`."""
    probe.see()
    command, _, argument = (request.texts[0] if request.texts else "ok").partition(" ")
    if command == "raise":
        error_class = getattr(errors, argument)
        raise error_class(f"{argument}: the message a person can act on")
    if command == "limit":
        raise errors.RateLimited("over the key's limit", int(argument))
    if command == "crash":
        raise RuntimeError(SECRET)
    if command == "abort":
        await ctx.abort(grpc.StatusCode.NOT_FOUND, "aborted by the handler")
    if command == "hang":
        await asyncio.sleep(60)


def handlers(probe: Probe) -> grpc.GenericRpcHandler:
    async def unary(request: TokenizeRequest, ctx: grpc.aio.ServicerContext) -> TokenizeRequest:
        await act(probe, request, ctx)
        return request

    async def stream(
        request: TokenizeRequest, ctx: grpc.aio.ServicerContext
    ) -> AsyncIterator[TokenizeRequest]:
        yield request  # one reply goes out before the handler acts
        await act(probe, request, ctx)
        yield request

    async def upload(requests: Any, ctx: grpc.aio.ServicerContext) -> TokenizeRequest:
        last = TokenizeRequest()
        async for request in requests:
            last = request
        await act(probe, last, ctx)
        return last

    codec = {
        "request_deserializer": TokenizeRequest.FromString,
        "response_serializer": TokenizeRequest.SerializeToString,
    }
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, **codec),
            "Stream": grpc.unary_stream_rpc_method_handler(stream, **codec),
            "Upload": grpc.stream_unary_rpc_method_handler(upload, **codec),
        },
    )


@dataclass
class Served:
    probe: Probe
    channel: grpc.aio.Channel

    def unary(self, serialize: bool = True) -> grpc.aio.UnaryUnaryMultiCallable:
        return self.channel.unary_unary(
            f"/{SERVICE}/Unary",
            request_serializer=TokenizeRequest.SerializeToString if serialize else None,
            response_deserializer=TokenizeRequest.FromString,
        )

    def stream(self) -> grpc.aio.UnaryStreamMultiCallable:
        return self.channel.unary_stream(
            f"/{SERVICE}/Stream",
            request_serializer=TokenizeRequest.SerializeToString,
            response_deserializer=TokenizeRequest.FromString,
        )

    def upload(self, serialize: bool = True) -> grpc.aio.StreamUnaryMultiCallable:
        return self.channel.stream_unary(
            f"/{SERVICE}/Upload",
            request_serializer=TokenizeRequest.SerializeToString if serialize else None,
            response_deserializer=TokenizeRequest.FromString,
        )


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[Served]:
    probe = Probe()
    server = grpc.aio.server(interceptors=[ServiceInterceptor("probe", probe)])
    server.add_generic_rpc_handlers([handlers(probe)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield Served(probe, channel)
    await channel.close()
    await server.stop(None)


@pytest.fixture
def served(server: Served) -> Served:
    """The module's server with a fresh probe record."""
    probe = server.probe
    probe.request_ids.clear()
    probe.deadlines_left.clear()
    probe.observed.clear()
    probe.in_flight.clear()
    return server


def say(text: str, model: str = "m") -> TokenizeRequest:
    return TokenizeRequest(model=model, texts=[text])


def trailing(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    return dict(error.trailing_metadata() or ())


async def failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


# --- request id ------------------------------------------------------------------------------


async def test_a_request_id_is_generated_when_the_caller_sends_none(served: Served) -> None:
    await served.unary()(say("ok"))
    await served.unary()(say("ok"))
    first, second = served.probe.request_ids
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert first != second


async def test_the_callers_request_id_is_bound_and_echoed_on_failure(served: Served) -> None:
    await served.unary()(say("ok"), metadata=((REQUEST_ID_KEY, "req-123"),))
    error = await failure(
        served.unary()(say("raise Overloaded"), metadata=((REQUEST_ID_KEY, "req-456"),))
    )
    assert served.probe.request_ids == ["req-123", "req-456"]
    assert trailing(error)[REQUEST_ID_KEY] == "req-456"


async def test_a_generated_request_id_is_the_one_a_failure_quotes(served: Served) -> None:
    error = await failure(served.unary()(say("crash")))
    (bound,) = served.probe.request_ids
    assert trailing(error)[REQUEST_ID_KEY] == bound
    match = INTERNAL_TEXT.fullmatch(error.details() or "")
    assert match and match.group(1) == bound


# --- deadline --------------------------------------------------------------------------------


async def test_the_callers_deadline_is_bound_for_downstream_calls(served: Served) -> None:
    await served.unary()(say("ok"), timeout=5.0)
    (left,) = served.probe.deadlines_left
    # gRPC rounds the timeout it sends up (to 5.009 s here), never down by much.
    assert left is not None and 4.0 < left <= 5.1


async def test_no_deadline_when_the_caller_set_none(served: Served) -> None:
    await served.unary()(say("ok"))
    assert served.probe.deadlines_left == [None]


# --- errors ----------------------------------------------------------------------------------


def subclasses(root: type[FmserveError]) -> list[type[FmserveError]]:
    return [c for sub in root.__subclasses__() for c in (sub, *subclasses(sub))]


# The tree drawn in fmserve/errors.py (a service's own subclasses, when imported, are left out).
ERROR_CLASSES = sorted(
    (cls for cls in subclasses(FmserveError) if cls.__module__ == errors.__name__),
    key=lambda cls: cls.__name__,
)


@pytest.mark.parametrize("error_class", ERROR_CLASSES, ids=lambda cls: cls.__name__)
async def test_each_fmserve_error_keeps_its_code_message_and_class(
    served: Served, error_class: type[FmserveError]
) -> None:
    name = error_class.__name__
    error = await failure(served.unary()(say(f"raise {name}")))
    assert error.code() == error_class.code
    assert error.details() == f"{name}: the message a person can act on"
    assert trailing(error)[ERROR_TYPE_KEY] == name
    assert type(errors.from_rpc_error(error)) is error_class  # the client raises the same class


async def test_an_errors_own_trailers_reach_the_client(served: Served) -> None:
    error = await failure(served.unary()(say("limit 250")))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert trailing(error)[errors.RETRY_AFTER_KEY] == "250"
    raised = errors.from_rpc_error(error)
    assert isinstance(raised, errors.RateLimited) and raised.retry_after_ms == 250


async def test_an_unknown_exception_is_internal_with_a_fixed_text(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="fmserve.rpc"):
        error = await failure(served.unary()(say("crash")))
    assert error.code() is grpc.StatusCode.INTERNAL
    assert INTERNAL_TEXT.fullmatch(error.details() or "")
    assert ERROR_TYPE_KEY not in trailing(error)
    leaked = " ".join(f"{k}={v}" for k, v in trailing(error).items()) + (error.details() or "")
    assert "hunter2" not in leaked and "RuntimeError" not in leaked
    (record,) = [r for r in caplog.records if r.name == "fmserve.rpc"]
    assert record.exc_info and SECRET in str(record.exc_info[1])  # the detail is in the log


async def test_the_base_error_class_is_treated_as_unexpected(served: Served) -> None:
    """A bare FmserveError names no kind a client could act on: INTERNAL, message withheld."""
    error = await failure(served.unary()(say("raise FmserveError")))
    assert error.code() is grpc.StatusCode.INTERNAL
    assert INTERNAL_TEXT.fullmatch(error.details() or "")


async def test_a_handlers_own_abort_passes_through(served: Served) -> None:
    error = await failure(served.unary()(say("abort")))
    assert (error.code(), error.details()) == (grpc.StatusCode.NOT_FOUND, "aborted by the handler")
    assert await served.probe.observations(1) == [("Unary", "m", "NOT_FOUND")]


async def test_errors_in_a_server_stream_are_mapped_after_the_replies_sent(
    served: Served,
) -> None:
    call = served.stream()(say("raise Unavailable"))
    replies = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for reply in call:
            replies.append(reply)
    assert len(replies) == 1
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert trailing(caught.value)[ERROR_TYPE_KEY] == "Unavailable"


async def test_errors_in_a_client_stream_are_mapped(served: Served) -> None:
    error = await failure(served.upload()(iter([say("ok"), say("raise JobNotFound")])))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert trailing(error)[ERROR_TYPE_KEY] == "JobNotFound"


# --- undecodable requests --------------------------------------------------------------------

NOT_A_MESSAGE = b"\x0a\x05ab"  # field 1 says five bytes follow; two do


async def test_an_undecodable_request_is_invalid_argument(served: Served) -> None:
    error = await failure(served.unary(serialize=False)(NOT_A_MESSAGE))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid fmserve.v1.TokenizeRequest message" in (error.details() or "")
    assert trailing(error)[ERROR_TYPE_KEY] == "InvalidInput"
    assert served.probe.request_ids == []  # the handler never ran


async def test_an_undecodable_message_in_a_client_stream_is_invalid_argument(
    served: Served,
) -> None:
    good = say("ok").SerializeToString()
    error = await failure(served.upload(serialize=False)(iter([good, NOT_A_MESSAGE])))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "fmserve.v1.TokenizeRequest" in (error.details() or "")


# --- metrics ---------------------------------------------------------------------------------


async def test_metrics_name_the_method_model_and_code(served: Served) -> None:
    await served.unary()(say("ok", model="mini"))
    await failure(served.unary()(say("raise Overloaded", model="mini")))
    await failure(served.unary()(say("raise ModelNotFound", model="typo-of-a-model")))
    await failure(served.unary()(say("raise InvalidInput", model="x" * 200)))
    assert await served.probe.observations(4) == [
        ("Unary", "mini", "OK"),
        ("Unary", "mini", "RESOURCE_EXHAUSTED"),
        # The model as the request names it: RpcMetrics bounds the labels it becomes
        # (tests/unit/test_metrics_labels.py), so a client's typo never becomes one.
        ("Unary", "typo-of-a-model", "NOT_FOUND"),
        ("Unary", "x" * 200, "INVALID_ARGUMENT"),
    ]


async def test_a_call_whose_deadline_passed_is_recorded_as_the_client_saw_it(
    served: Served,
) -> None:
    error = await failure(served.unary()(say("hang"), timeout=0.2))
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert await served.probe.observations(1) == [("Unary", "m", "DEADLINE_EXCEEDED")]


async def test_a_call_the_client_cancelled_is_recorded_as_cancelled(served: Served) -> None:
    call = served.unary()(say("hang"), timeout=5)
    await asyncio.sleep(0.2)
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await call
    assert await served.probe.observations(1) == [("Unary", "m", "CANCELLED")]


async def test_calls_in_flight_rise_while_handled_and_fall_on_every_ending(served: Served) -> None:
    """The autoscalers' signal (deploy/k8s/): every call counts while it runs, and is taken off
    however it ends: answered, failed, cancelled or past its deadline."""
    hanging = [served.unary()(say("hang"), timeout=0.5) for _ in range(3)]
    stream = served.stream()(say("hang"), timeout=0.5)
    await stream.read()  # its first reply is out: the stream is being handled
    deadline = time.monotonic() + 2.0
    while served.probe.in_flight.get("Unary", 0) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert served.probe.in_flight == {"Unary": 3, "Stream": 1}
    await served.unary()(say("ok"))
    await failure(served.unary()(say("raise Overloaded")))
    for call in [*hanging, stream.read()]:
        await failure(call)
    await served.probe.observations(6)
    assert served.probe.in_flight == {"Unary": 0, "Stream": 0}
