"""The gateway's client of the cache service's fmserve.v1.RateLimits: the one boundary that sees
those calls' gRPC errors. Every failure to reach the limits leaves as Unavailable, so a call
whose limits cannot be checked is refused (fail closed), never let through.

Claims are coalesced: a claim made while no Admit call is in flight goes out at once (a lone
call waits for nothing); claims made while one is in flight wait for it and go out together in
the next, so under load the gateway pays one round trip for many calls, not one each. Slots are
given back the same way, in the background: a call's answer never waits for its release."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

import grpc

from fmserve.core.context import remaining_s
from fmserve.errors import DeadlineExceeded, FmserveError, Unavailable
from fmserve.rpc.channels import open_channel
from fmserve.rpc.tls import Identity
from fmserve.v1 import limits_pb2, limits_pb2_grpc

log = logging.getLogger("fmserve.gateway.limits")

MAX_CLAIMS = 256
"""Most claims in one Admit call."""

UNREACHABLE = (
    "this API key's limits cannot be checked: the cache service or its Redis is unavailable, "
    "and calls by keys with limits are refused until it is back; retry shortly"
)


class LimitsClient:
    """Admit, release and renew calls against the shared limits. `start()` opens the channel."""

    def __init__(
        self,
        address: str,
        timeout_s: float,
        max_message_bytes: int,
        identity: Identity | None = None,
    ) -> None:
        self.address = address
        self._identity = identity
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self._channel: grpc.aio.Channel | None = None
        self._waiting: list[tuple[limits_pb2.Claim, asyncio.Future[limits_pb2.Verdict]]] = []
        self._sender: asyncio.Task[None] | None = None
        self._releasing: list[limits_pb2.Slot] = []
        self._releaser: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._channel = open_channel(self.address, self.max_message_bytes, self._identity)
        self._stub = limits_pb2_grpc.RateLimitsStub(self._channel)

    async def stop(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        if self._releaser is not None:  # slots already given back go out (within the timeout)
            await asyncio.gather(self._releaser, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def admit(self, claim: limits_pb2.Claim) -> limits_pb2.Verdict:
        """The claim's verdict, within what is left of the caller's deadline (at most
        timeout_s: a check that takes longer is refused)."""
        timeout = remaining_s(self.timeout_s)
        verdict = asyncio.get_running_loop().create_future()
        self._waiting.append((claim, verdict))
        if self._sender is None:
            self._sender = _background(self._send_all())
        try:
            return await asyncio.wait_for(verdict, timeout)
        except TimeoutError:
            if timeout < self.timeout_s:
                raise DeadlineExceeded(
                    "the deadline expired while this API key's limits were checked"
                ) from None
            raise Unavailable(UNREACHABLE) from None

    async def _send_all(self) -> None:
        """Send what waits, one Admit call at a time, until nothing does."""
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:MAX_CLAIMS], self._waiting[MAX_CLAIMS:]
                batch = [(claim, verdict) for claim, verdict in batch if not verdict.done()]
                if batch:
                    await self._send(batch)
        finally:
            self._sender = None

    async def _send(
        self, batch: list[tuple[limits_pb2.Claim, asyncio.Future[limits_pb2.Verdict]]]
    ) -> None:
        request = limits_pb2.AdmitRequest(claims=[claim for claim, _ in batch])
        try:
            reply = await self._call("Admit", request)
            if len(reply.verdicts) != len(batch):
                log.error(
                    "the cache service answered %d claims with %d verdicts",
                    len(batch),
                    len(reply.verdicts),
                )
                raise FmserveError("the limits check failed")
        except FmserveError as exc:
            for claim, verdict in batch:
                if not verdict.done():  # each waiter its own error, with its own traceback
                    verdict.set_exception(type(exc)(exc.message))
                else:
                    self._abandoned(claim)
            return
        for (claim, verdict), answer in zip(batch, reply.verdicts, strict=True):
            if not verdict.done():
                verdict.set_result(answer)
            elif answer.admitted:
                self._abandoned(claim)

    def _abandoned(self, claim: limits_pb2.Claim) -> None:
        """Its caller left (cancelled, out of time) while the claim was being checked: give
        back a slot it may have taken, now that the check is over (a release sent before the
        check ran would find nothing to release, and the slot would wait for its lease)."""
        if claim.max_concurrency:
            self.release(claim.key_id, claim.call_id)

    def release(self, key_id: str, call_id: str) -> None:
        """Give a slot back, in the background (a failure is logged: the slot's lease is the
        backstop)."""
        self._releasing.append(limits_pb2.Slot(key_id=key_id, call_id=call_id))
        if self._releaser is None:
            self._releaser = _background(self._release_all())

    async def _release_all(self) -> None:
        try:
            while self._releasing:
                batch = self._releasing[:MAX_CLAIMS]
                self._releasing = self._releasing[MAX_CLAIMS:]
                try:
                    await self._call("Release", limits_pb2.ReleaseRequest(slots=batch))
                except FmserveError as exc:
                    log.warning(
                        "could not give back %d concurrency slots (their leases free them): %s",
                        len(batch),
                        exc,
                    )
        finally:
            self._releaser = None

    async def renew(self, slots: Sequence[tuple[str, str]], lease_ms: int) -> None:
        wire = [limits_pb2.Slot(key_id=k, call_id=c) for k, c in slots]
        await self._call("RenewSlots", limits_pb2.RenewSlotsRequest(slots=wire, lease_ms=lease_ms))

    async def _call(self, method: str, request: object) -> Any:
        if self._channel is None:
            raise Unavailable(UNREACHABLE)
        try:
            return await getattr(self._stub, method)(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from None


def _background(work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """A task in a context of its own: a batch is no one caller's (request id, trace)."""
    return asyncio.create_task(work, context=contextvars.Context())


def _translate(exc: grpc.aio.AioRpcError) -> FmserveError:
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(UNREACHABLE)
    # Anything else is the gateway's fault (a request the cache refused), not the client's.
    log.error("the cache service refused a limits call (%s): %s", code.name, exc.details())
    return FmserveError("the limits check failed")
