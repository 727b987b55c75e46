"""The gateway's client of the cache service's fmserve.v1.RateLimits: the one boundary that sees
those calls' gRPC errors. Every failure to reach the limits leaves as Unavailable, so a call
whose limits cannot be checked is refused (fail closed), never let through.

Claims are coalesced: a claim made while no Admit call is in flight goes out at once (a lone
call waits for nothing); claims made while one is in flight wait for it and go out together in
the next, so under load the gateway pays one round trip for many calls, not one each. Slots,
unused quota and unspent leased tokens are given back the same way, in the background: a
call's answer never waits for them (a give-back that fails is logged: a slot's lease frees
it; unused items stay counted)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Coroutine, Sequence
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
        self._slots = _Outbox(
            self,
            "Release",
            lambda slots: limits_pb2.ReleaseRequest(slots=slots),
            "concurrency slots (their leases free them)",
        )
        self._refunds = _Outbox(
            self,
            "Refund",
            lambda refunds: limits_pb2.RefundRequest(refunds=refunds),
            "refunds of unused quota items (they stay counted today)",
        )
        self._tokens = _Outbox(
            self,
            "Refund",
            lambda tokens: limits_pb2.RefundRequest(tokens=tokens),
            "refunds of unspent leased tokens (their buckets refill anyway)",
        )

    async def start(self) -> None:
        self._channel = open_channel(self.address, self.max_message_bytes, self._identity)
        self._stub = limits_pb2_grpc.RateLimitsStub(self._channel)

    async def stop(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        # What was already given back goes out (within the timeout).
        await asyncio.gather(self._slots.drained(), self._refunds.drained(), self._tokens.drained())
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
                    self._abandoned(claim, None)
            return
        for (claim, verdict), answer in zip(batch, reply.verdicts, strict=True):
            if not verdict.done():
                verdict.set_result(answer)
            elif answer.admitted:
                self._abandoned(claim, answer)

    def _abandoned(self, claim: limits_pb2.Claim, answer: limits_pb2.Verdict | None) -> None:
        """Its caller left (cancelled, out of time) while the claim was being checked: give
        back a slot it may have taken, now that the check is over (a release sent before the
        check ran would find nothing to release, and the slot would wait for its lease), and
        the items and tokens it was admitted with (`answer`), since the call never ran."""
        if claim.max_concurrency:
            self.release(claim.key_id, claim.call_id)
        if answer is None:
            return
        if claim.items:
            self.refund(claim.key_id, answer.day, claim.items)
        for bucket, taken in zip(claim.buckets, answer.taken, strict=False):
            if taken:
                self.give_back(
                    limits_pb2.TokenRefund(key_id=claim.key_id, bucket=bucket, tokens=taken)
                )

    def release(self, key_id: str, call_id: str) -> None:
        """Give a slot back, in the background."""
        self._slots.put(limits_pb2.Slot(key_id=key_id, call_id=call_id))

    def refund(self, key_id: str, day: int, items: int) -> None:
        """Give back items counted against `day`'s quota and not used, in the background."""
        self._refunds.put(limits_pb2.ItemRefund(key_id=key_id, day=day, items=items))

    def give_back(self, refund: limits_pb2.TokenRefund) -> None:
        """Give back tokens a lease did not spend, in the background."""
        self._tokens.put(refund)

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


class _Outbox:
    """Messages given back in the background, batched: one call of `method` at a time."""

    def __init__(
        self, client: LimitsClient, method: str, request: Callable[[list[Any]], Any], what: str
    ) -> None:
        self.client, self.method, self.request, self.what = client, method, request, what
        self._queued: list[Any] = []
        self._sender: asyncio.Task[None] | None = None

    def put(self, message: Any) -> None:
        self._queued.append(message)
        if self._sender is None:
            self._sender = _background(self._send_all())

    async def drained(self) -> None:
        if self._sender is not None:
            await asyncio.gather(self._sender, return_exceptions=True)

    async def _send_all(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued[:MAX_CLAIMS], self._queued[MAX_CLAIMS:]
                try:
                    await self.client._call(self.method, self.request(batch))
                except FmserveError as exc:
                    log.warning("could not give back %d %s: %s", len(batch), self.what, exc)
        finally:
            self._sender = None


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
