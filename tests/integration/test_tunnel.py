"""The tunnel (fmserve/rpc/tunnel_*.py) on real grpc.aio servers: a stage's unary calls sent
as messages on streams kept open keep everything a unary call has (outcome, status and
trailers, request id, deadline, cancellation), run concurrently on one stream, fall back to
unary calls where the tunnel is not served, and do not hold a stopping server up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from fmserve.core import context
from fmserve.core.settings import ServiceSettings
from fmserve.errors import InputTooLong, Unavailable, from_rpc_error
from fmserve.rpc.interceptors import RESENT_KEY
from fmserve.rpc.service import Service, Servicer
from fmserve.rpc.tunnel_client import TunnelChannel, open_tunnel_channel
from fmserve.rpc.tunnel_server import MessageContext
from fmserve.v1 import preprocess_pb2, preprocess_pb2_grpc, tunnel_pb2, tunnel_pb2_grpc
from tests.integration.stage_fakes import FakePreprocess, Stage


class Recording(FakePreprocess):
    """The fake preprocess, noting how each call came (its context's type) and whether its
    handler was cancelled."""

    def __init__(self, stage: Stage) -> None:
        super().__init__(stage)
        self.contexts: list[type] = []
        self.metadata: list[dict[str, str]] = []
        self.cancelled = asyncio.Event()

    async def Tokenize(
        self, request: preprocess_pb2.TokenizeRequest, context: Any
    ) -> preprocess_pb2.TokenizeResponse:
        self.contexts.append(type(context))
        self.metadata.append(dict(context.invocation_metadata() or ()))
        try:
            return await super().Tokenize(request, context)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


def request(*texts: str) -> preprocess_pb2.TokenizeRequest:
    return preprocess_pb2.TokenizeRequest(model="m", texts=list(texts))


def servicer(recording: Recording) -> Servicer:
    return Servicer(
        preprocess_pb2_grpc.add_PreprocessServicer_to_server, recording, "fmserve.v1.Preprocess"
    )


@pytest.fixture
def recording() -> Recording:
    return Recording(Stage())


@pytest.fixture
async def service(recording: Recording) -> AsyncIterator[Service]:
    settings = ServiceSettings(host="127.0.0.1", port=0, metrics_port=-1, grace_period_s=5.0)
    service = Service("tunnel_test", settings, [servicer(recording)])
    await service.start()
    yield service
    await service.stop()


def channel_to(port: int, streams: int = 2, max_age_s: float = 30.0) -> TunnelChannel:
    return open_tunnel_channel(f"127.0.0.1:{port}", 4 * 1024 * 1024, None, streams, max_age_s)


async def held_call(
    stub: preprocess_pb2_grpc.PreprocessStub, recording: Recording, text: str, timeout: float
) -> asyncio.Task[preprocess_pb2.TokenizeResponse]:
    """A call started, once the stage has it (held there by the stage's gate)."""
    call = asyncio.create_task(stub.Tokenize(request(text), timeout=timeout))
    while not recording.stage.calls:
        await asyncio.sleep(0.01)
    return call


async def test_calls_travel_as_messages_and_keep_request_id_and_deadline(
    service: Service, recording: Recording
) -> None:
    async with channel_to(service.port) as channel:
        stub = preprocess_pb2_grpc.PreprocessStub(channel)
        token = context.request_id.set("req-tunnel-1")
        try:
            replies = [await stub.Tokenize(request("a bb", "ccc"), timeout=5) for _ in range(3)]
        finally:
            context.request_id.reset(token)
    assert [list(r.lengths.shape) for r in replies] == [[2]] * 3
    assert recording.contexts == [MessageContext] * 3
    assert [c.request_id for c in recording.stage.calls] == ["req-tunnel-1"] * 3
    for call in recording.stage.calls:
        assert call.time_left_s is not None and 4.0 < call.time_left_s <= 5.0


async def test_an_error_keeps_its_status_message_and_type(
    service: Service, recording: Recording
) -> None:
    async with channel_to(service.port) as channel:
        stub = preprocess_pb2_grpc.PreprocessStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Tokenize(request("fine", "please refuse me"), timeout=5)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(caught.value)
    assert isinstance(error, InputTooLong)
    assert error.message == "texts[1] is over m's maximum length"
    assert recording.contexts == [MessageContext]


def status(reply: tunnel_pb2.TunnelReply) -> grpc.StatusCode:
    return next(code for code in grpc.StatusCode if code.value[0] == reply.code)


async def test_a_bad_message_is_refused_as_a_unary_call_would_be_and_the_stream_goes_on(
    service: Service, recording: Recording
) -> None:
    tokenize, good = "/fmserve.v1.Preprocess/Tokenize", request("a bb").SerializeToString()
    sent = {
        1: tunnel_pb2.TunnelRequest(method=tokenize, payload=b"\xff\xff\xff"),  # cut short
        2: tunnel_pb2.TunnelRequest(method="/fmserve.v1.Preprocess/Detokenize", payload=good),
        3: tunnel_pb2.TunnelRequest(method=tokenize, payload=good, metadata={"x-big": "x" * 9000}),
        4: tunnel_pb2.TunnelRequest(method=tokenize, payload=good, timeout_s=5),
    }
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stream = tunnel_pb2_grpc.TunnelStub(channel).Open()
        for id_, message in sent.items():
            message.id = id_
            await stream.write(message)
        replies = {}
        for _ in sent:
            reply = await stream.read()
            replies[reply.id] = reply
        await stream.done_writing()

    assert status(replies[1]) is grpc.StatusCode.INVALID_ARGUMENT
    assert replies[1].message == (
        "the request is not a valid fmserve.v1.TokenizeRequest message; "
        "build it with the stubs generated from protos/"
    )
    assert status(replies[2]) is grpc.StatusCode.UNIMPLEMENTED
    assert "Detokenize is not a unary method of this service" in replies[2].message
    assert status(replies[3]) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert replies[3].message == (
        "the call's metadata is 9037 bytes, over this service's limit of 8192"
    )
    assert status(replies[4]) is grpc.StatusCode.OK
    assert list(preprocess_pb2.TokenizeResponse.FromString(replies[4].payload).lengths.shape) == [1]
    assert [c.request.texts for c in recording.stage.calls] == [["a bb"]]  # the bad ones never ran


async def test_a_call_past_its_timeout_is_deadline_exceeded_and_its_handler_stopped(
    service: Service, recording: Recording
) -> None:
    recording.stage.delay_s = 10.0
    async with channel_to(service.port) as channel:
        stub = preprocess_pb2_grpc.PreprocessStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Tokenize(request("slow"), timeout=0.3)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2.0
        await asyncio.wait_for(recording.cancelled.wait(), 2.0)


async def test_a_caller_that_gives_up_stops_the_handler(
    service: Service, recording: Recording
) -> None:
    recording.stage.gate = asyncio.Event()
    async with channel_to(service.port) as channel:
        stub = preprocess_pb2_grpc.PreprocessStub(channel)
        call = await held_call(stub, recording, "held", 30)
        call.cancel()
        await asyncio.wait_for(recording.cancelled.wait(), 2.0)


async def test_calls_on_one_stream_run_at_once_and_are_answered_as_they_finish(
    service: Service, recording: Recording
) -> None:
    gate = recording.stage.gate = asyncio.Event()
    async with channel_to(service.port, streams=1) as channel:
        stub = preprocess_pb2_grpc.PreprocessStub(channel)
        held = await held_call(stub, recording, "first", 10)
        recording.stage.gate = None
        second = await asyncio.wait_for(stub.Tokenize(request("second one"), timeout=10), 5.0)
        assert not held.done()
        gate.set()
        first = await held
    assert (list(first.lengths.shape), list(second.lengths.shape)) == ([1], [1])
    assert recording.contexts == [MessageContext] * 2


async def test_a_server_without_the_tunnel_gets_plain_unary_calls(recording: Recording) -> None:
    server = grpc.aio.server()
    preprocess_pb2_grpc.add_PreprocessServicer_to_server(recording, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with channel_to(port) as channel:
            stub = preprocess_pb2_grpc.PreprocessStub(channel)
            replies = [await stub.Tokenize(request("a", "b c"), timeout=5) for _ in range(3)]
    finally:
        await server.stop(None)
    assert [list(r.lengths.shape) for r in replies] == [[2]] * 3
    assert MessageContext not in recording.contexts
    assert len(recording.contexts) == 3
    assert all(RESENT_KEY not in m for m in recording.metadata)  # refused streams ran nothing
    await asyncio.sleep(0.1)
    # The streams the server refused left no task of gRPC's waiting for requests to send.
    leftover = [t for t in asyncio.all_tasks() if "request_iterator" in repr(t.get_coro())]
    assert not leftover


async def test_a_call_the_stage_answers_unavailable_goes_again_within_its_deadline(
    service: Service, recording: Recording
) -> None:
    """Unavailable after 1 s on the tunnel, the call goes again as a unary call (marked as a
    retry) with what is left of its 1.5 s, not 1.5 s again."""
    recording.stage.delay_s, recording.stage.error = 1.0, Unavailable("warming up")
    async with channel_to(service.port) as channel:
        stub = preprocess_pb2_grpc.PreprocessStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Tokenize(request("x"), timeout=1.5)
        elapsed = time.monotonic() - started
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 2.2
    second = recording.stage.calls[1]
    assert recording.contexts[0] is MessageContext and recording.contexts[1] is not MessageContext
    assert second.time_left_s is not None and second.time_left_s < 0.6
    assert RESENT_KEY not in recording.metadata[0] and recording.metadata[1][RESENT_KEY] == "1"


async def test_a_big_request_goes_as_a_unary_call(service: Service, recording: Recording) -> None:
    async with channel_to(service.port) as channel:
        stub = preprocess_pb2_grpc.PreprocessStub(channel)
        reply = await stub.Tokenize(request("word " * 250_000), timeout=10)
    assert list(reply.lengths.shape) == [1]
    assert len(recording.contexts) == 1 and recording.contexts[0] is not MessageContext


async def test_streams_are_replaced_when_they_age(service: Service, recording: Recording) -> None:
    """Each call on a fresh stream (max age 0): retired streams end once answered, so the
    server is left holding one stream, not one per call."""
    async with channel_to(service.port, streams=1, max_age_s=0.0) as channel:
        stub = preprocess_pb2_grpc.PreprocessStub(channel)
        for _ in range(5):
            await stub.Tokenize(request("x"), timeout=5)
        tunnel = service.tunnel
        assert tunnel is not None
        deadline = time.monotonic() + 5
        while tunnel.open_streams > 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert tunnel.open_streams == 1
    assert recording.contexts == [MessageContext] * 5


async def test_a_stopping_server_answers_what_it_started_without_waiting_its_grace(
    recording: Recording,
) -> None:
    settings = ServiceSettings(host="127.0.0.1", port=0, metrics_port=-1, grace_period_s=20.0)
    service = Service("tunnel_stop", settings, [servicer(recording)])
    await service.start()
    gate = recording.stage.gate = asyncio.Event()
    async with channel_to(service.port, streams=1) as channel:
        stub = preprocess_pb2_grpc.PreprocessStub(channel)
        held = await held_call(stub, recording, "in flight", 30)
        started = time.monotonic()
        stopping = asyncio.create_task(service.stop())
        await asyncio.sleep(0.2)
        # A call sent while the stage drains is refused at once (as not run), not held
        # behind the one in flight; sent again as a unary call, the stopping server refuses it.
        refused_at = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Tokenize(request("too late"), timeout=5)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - refused_at < 2.0
        assert not held.done()
        gate.set()
        reply = await asyncio.wait_for(held, 5.0)
        await asyncio.wait_for(stopping, 5.0)
    assert list(reply.lengths.shape) == [1]
    assert time.monotonic() - started < 5.0  # the grace is 20 s: the stream did not hold it
    assert len(recording.stage.calls) == 1  # the refused call never ran


def requests_counted(service: str, code: str) -> float:
    """The service's Tokenize calls that ended with `code`, over every model label."""
    name = f"fmserve_{service}_requests_total"
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        for sample in metric.samples
        if sample.name == name
        and sample.labels.get("method") == "Tokenize"
        and sample.labels.get("code") == code
    )


async def test_the_stage_counts_a_call_past_its_timeout_as_a_deadline(
    service: Service, recording: Recording
) -> None:
    """As for a unary call: the stage's own timer ends it, not a cancel from the caller."""
    before = requests_counted("tunnel_test", "DEADLINE_EXCEEDED")
    cancelled_before = requests_counted("tunnel_test", "CANCELLED")
    recording.stage.delay_s = 10.0
    async with channel_to(service.port) as channel:
        stub = preprocess_pb2_grpc.PreprocessStub(channel)
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Tokenize(request("slow"), timeout=0.2)
        deadline = time.monotonic() + 5
        while requests_counted("tunnel_test", "DEADLINE_EXCEEDED") - before < 3:
            assert time.monotonic() < deadline, "the stage did not count three deadlines"
            await asyncio.sleep(0.02)
    assert requests_counted("tunnel_test", "CANCELLED") == cancelled_before


async def test_a_replica_that_dies_mid_call_has_its_calls_sent_to_another(
    recording: Recording,
) -> None:
    """Two replicas; a call held on one when it stops at once (no grace) goes again, as a
    unary call marked as a retry, and the other answers it."""
    survivor_recording = Recording(Stage())
    settings = ServiceSettings(host="127.0.0.1", port=0, metrics_port=-1, grace_period_s=0.0)
    doomed = Service("tunnel_doomed", settings, [servicer(recording)])
    survivor = Service("tunnel_survivor", settings, [servicer(survivor_recording)])
    await doomed.start()
    await survivor.start()
    recording.stage.gate = asyncio.Event()  # the doomed replica never answers
    address = f"127.0.0.1:{doomed.port},127.0.0.1:{survivor.port}"
    try:
        # Streams replaced every 50 ms, so that round robin soon opens one on each replica.
        async with open_tunnel_channel(address, 4 * 1024 * 1024, None, 2, 0.05) as channel:
            stub = preprocess_pb2_grpc.PreprocessStub(channel)
            calls: list[asyncio.Task[preprocess_pb2.TokenizeResponse]] = []
            deadline = time.monotonic() + 5
            while not recording.stage.calls:
                assert time.monotonic() < deadline, "no call reached the first replica"
                call = stub.Tokenize(request(f"call {len(calls)}"), timeout=10)
                calls.append(asyncio.create_task(call))
                await asyncio.sleep(0.02)
            await doomed.stop()
            replies = await asyncio.wait_for(asyncio.gather(*calls), 8.0)
    finally:
        await survivor.stop()
    assert [list(r.lengths.shape) for r in replies] == [[1]] * len(calls)
    resent = [m for m in survivor_recording.metadata if m.get(RESENT_KEY) == "1"]
    assert len(resent) == len(recording.stage.calls) >= 1
