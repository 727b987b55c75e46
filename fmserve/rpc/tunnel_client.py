"""The client side of `fmserve.v1.Tunnel`: a channel whose unary calls travel as messages on
a few streams kept open to the service, at about half a unary call's cost (bench/hops.py).
Stubs made on it work unchanged; every other call shape is a plain gRPC call.

What a unary call gives, a tunnelled one keeps:
- its outcome: the reply's status and trailing metadata come back as the `AioRpcError` a
  unary call raises, so error handling does not change;
- its deadline and cancellation: the timeout travels with the message (the server cancels the
  handler when it passes), and a caller that gives up tells the server to stop;
- its request id and trace, carried in the message;
- retries and balancing: a call the tunnel cannot carry (the stream broke, the service does
  not serve the tunnel, or it answered UNAVAILABLE) goes again as a unary call, with the
  channel's retry policy. Each stream stays on the replica it opened on, so calls are spread
  over `streams` streams in turn, and each stream is retired after `max_age_s` for a new one,
  which the channel's round robin may place on another replica (new replicas get traffic).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from fmserve.rpc.channels import PropagatingChannel, bare_channel, outgoing_metadata
from fmserve.rpc.interceptors import RESENT_KEY
from fmserve.rpc.tls import Identity
from fmserve.rpc.tunnel_server import NOT_RUN_KEY, SERVICE
from fmserve.v1 import tunnel_pb2

log = logging.getLogger("fmserve.rpc.tunnel")

OPEN = f"/{SERVICE}/Open"
UNSERVED_PAUSE_S = 60.0
"""How long a channel whose service does not serve the tunnel sends plain calls before trying
the tunnel again (a service of an older release, or another server speaking the protocol)."""
BROKEN_PAUSE_S = 1.0
"""How long a channel whose stream failed (the service was unreachable) sends plain calls."""
MAX_PAYLOAD_BYTES = 1024 * 1024
"""Bigger requests go as unary calls: one message over a limit (the stage's request bound)
would end the stream and every call on it, and a big one holds up the small ones behind it,
while saving nothing that matters against its own size."""


class NotCarried(Exception):
    """The tunnel did not carry the call: send it as a unary call. `attempted`: the call may
    have run (its stream broke under it), so the unary call is a retry."""

    def __init__(self, attempted: bool) -> None:
        self.attempted = attempted


class _Stream:
    """One open Tunnel call, carrying many calls at once."""

    def __init__(self, open_: grpc.aio.StreamStreamMultiCallable) -> None:
        self.opened = time.monotonic()
        self.closed = False
        self._retiring = False
        self._outbox: asyncio.Queue[tunnel_pb2.TunnelRequest | None] = asyncio.Queue()
        self._pending: dict[int, asyncio.Future[tunnel_pb2.TunnelReply]] = {}
        self._call = open_(self._requests())
        self._reader = asyncio.create_task(self._read())

    def send(self, request: tunnel_pb2.TunnelRequest) -> asyncio.Future[tunnel_pb2.TunnelReply]:
        future = asyncio.get_running_loop().create_future()
        self._pending[request.id] = future
        self._outbox.put_nowait(request)
        return future

    def cancel(self, id_: int) -> None:
        """The caller gave up on call `id_`: the server stops it, no reply is awaited."""
        if self._forget(id_) and not self.closed:
            self._outbox.put_nowait(tunnel_pb2.TunnelRequest(id=id_, cancel=True))
            self._end_if_retired()

    def forget(self, id_: int) -> None:
        """No reply is awaited for call `id_` any more, and the server is not told: its own
        timer ends the call as a deadline (a cancel would be counted as the caller's)."""
        self._forget(id_)
        self._end_if_retired()

    def retire(self) -> None:
        """Send nothing more; the calls under way are still answered (or cancelled), then the
        stream ends."""
        self._retiring = True
        self._end_if_retired()

    async def close(self) -> None:
        self._call.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    def _forget(self, id_: int) -> bool:
        return self._pending.pop(id_, None) is not None

    def _end_if_retired(self) -> None:
        if self._retiring and not self._pending:
            self._outbox.put_nowait(None)  # the request iterator ends: done writing

    async def _requests(self) -> AsyncIterator[tunnel_pb2.TunnelRequest]:
        while (request := await self._outbox.get()) is not None:
            yield request

    async def _read(self) -> None:
        error: grpc.aio.AioRpcError | None = None
        try:
            async for reply in self._call:
                future = self._pending.pop(reply.id, None)
                if future is not None and not future.done():
                    future.set_result(reply)
                    self._end_if_retired()
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:
            pass  # closed: the calls still pending go as unary calls
        finally:
            self.closed = True
            self._outbox.put_nowait(None)  # gRPC's task that reads our requests may end
            # A stream the server ended (OK: it drained) answered every call it started; a
            # server without the tunnel ran none. Otherwise a pending call may have run.
            attempted = error is not None and error.code() is not grpc.StatusCode.UNIMPLEMENTED
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(_Broken(error, attempted))
            self._pending.clear()


class _Broken(Exception):
    """The call's stream ended before its reply."""

    def __init__(self, error: grpc.aio.AioRpcError | None, attempted: bool) -> None:
        self.error = error
        self.attempted = attempted


class Tunnel:
    """A service's unary calls on `streams` streams kept open, taken in turn."""

    def __init__(self, channel: grpc.aio.Channel, streams: int, max_age_s: float) -> None:
        self._open = channel.stream_stream(
            OPEN,
            request_serializer=tunnel_pb2.TunnelRequest.SerializeToString,
            response_deserializer=tunnel_pb2.TunnelReply.FromString,
        )
        self._streams: list[_Stream | None] = [None] * max(1, streams)
        self._turn = itertools.cycle(range(len(self._streams)))
        self._ids = itertools.count(1)
        self._max_age_s = max_age_s
        self._paused_until = 0.0

    async def call(
        self, method: str, payload: bytes, timeout: float | None, metadata: dict[str, str]
    ) -> tunnel_pb2.TunnelReply:
        """The call's reply; raises NotCarried if the tunnel could not carry it."""
        if len(payload) > MAX_PAYLOAD_BYTES or time.monotonic() < self._paused_until:
            raise NotCarried(attempted=False)
        stream = self._stream()
        id_ = next(self._ids)
        request = tunnel_pb2.TunnelRequest(
            id=id_, method=method, payload=payload, timeout_s=timeout or 0.0, metadata=metadata
        )
        future = stream.send(request)
        try:
            async with asyncio.timeout(timeout):
                return await future
        except _Broken as broken:
            self._pause(broken.error)
            raise NotCarried(broken.attempted) from None
        except asyncio.CancelledError:
            stream.cancel(id_)
            raise
        except TimeoutError:
            stream.forget(id_)
            raise _deadline_exceeded() from None

    async def close(self) -> None:
        streams = [s for s in self._streams if s is not None]
        self._streams = [None] * len(self._streams)
        await asyncio.gather(*(s.close() for s in streams))

    def _stream(self) -> _Stream:
        index = next(self._turn)
        stream = self._streams[index]
        if stream is None or stream.closed or time.monotonic() - stream.opened > self._max_age_s:
            if stream is not None and not stream.closed:
                stream.retire()
            stream = self._streams[index] = _Stream(self._open)
        return stream

    def _pause(self, error: grpc.aio.AioRpcError | None) -> None:
        if error is None:
            return  # the service drained the stream: the next call opens another
        unserved = error.code() is grpc.StatusCode.UNIMPLEMENTED
        if unserved:
            log.info("the service does not serve the tunnel: plain unary calls for a while")
        self._paused_until = time.monotonic() + (UNSERVED_PAUSE_S if unserved else BROKEN_PAUSE_S)


def _deadline_exceeded() -> grpc.aio.AioRpcError:
    empty = grpc.aio.Metadata()
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.aio.AioRpcError(code, empty, empty, "Deadline Exceeded")


def open_tunnel_channel(
    address: str,
    max_message_bytes: int,
    identity: Identity | None,
    streams: int,
    max_age_s: float,
) -> TunnelChannel:
    """`fmserve.rpc.channels.open_channel`'s channel, its unary calls on a `Tunnel`."""
    return TunnelChannel(bare_channel(address, max_message_bytes, identity), streams, max_age_s)


class TunnelChannel(PropagatingChannel):
    """A channel (see `PropagatingChannel`) whose unary calls go through a `Tunnel`."""

    def __init__(self, channel: grpc.aio.Channel, streams: int, max_age_s: float) -> None:
        """`channel`: a bare one (`bare_channel`): each call adds its own metadata."""
        super().__init__(channel)
        self.tunnel = Tunnel(channel, streams, max_age_s)

    async def close(self, grace: float | None = None) -> None:
        await self.tunnel.close()
        await super().close(grace)

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close(None)

    def unary_unary(self, *args: Any, **kwargs: Any) -> grpc.aio.UnaryUnaryMultiCallable:
        method = args[0] if args else kwargs["method"]
        return _Tunnelled(
            self.tunnel,
            method,
            kwargs.get("request_serializer"),
            kwargs.get("response_deserializer"),
            super().unary_unary(*args, **kwargs),
        )


class _Tunnelled(grpc.aio.UnaryUnaryMultiCallable):
    """One unary method of a `TunnelChannel`: awaiting a call gives its response."""

    def __init__(
        self,
        tunnel: Tunnel,
        method: str,
        serialize: Callable[[Any], bytes] | None,
        deserialize: Callable[[bytes], Any] | None,
        unary: grpc.aio.UnaryUnaryMultiCallable,
    ) -> None:
        self._tunnel = tunnel
        self._method = method
        self._serialize = serialize or bytes
        self._deserialize = deserialize or (lambda data: data)
        self._unary = unary

    def __call__(  # type: ignore[override]
        self, request: Any, timeout: float | None = None, metadata: Any = None, **kwargs: Any
    ) -> Any:
        return self._call(request, timeout, metadata, kwargs)

    async def _call(
        self, request: Any, timeout: float | None, metadata: Any, kwargs: dict[str, Any]
    ) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        carried = outgoing_metadata()
        carried.update(metadata or ())
        if not kwargs and all(isinstance(v, str) for v in carried.values()):
            try:
                reply = await self._tunnel.call(
                    self._method, self._serialize(request), timeout, carried
                )
            except NotCarried as not_carried:
                if not_carried.attempted:
                    metadata = (*(metadata or ()), (RESENT_KEY, "1"))
            else:
                if reply.code != grpc.StatusCode.UNAVAILABLE.value[0]:
                    return self._outcome(reply)
                # Again as a unary call, which the channel's policy retries; a call refused
                # by a draining stage did not run.
                if NOT_RUN_KEY not in reply.trailing_metadata:
                    metadata = (*(metadata or ()), (RESENT_KEY, "1"))
            if deadline is not None:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    raise _deadline_exceeded()
        return await self._unary(request, timeout=timeout, metadata=metadata, **kwargs)

    def _outcome(self, reply: tunnel_pb2.TunnelReply) -> Any:
        if reply.code == 0:
            return self._deserialize(reply.payload)
        raise grpc.aio.AioRpcError(
            _CODES.get(reply.code, grpc.StatusCode.UNKNOWN),
            grpc.aio.Metadata(),
            grpc.aio.Metadata(*reply.trailing_metadata.items()),
            reply.message,
        )


_CODES = {code.value[0]: code for code in grpc.StatusCode}
