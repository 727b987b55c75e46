"""The gateway's client of the cache service's fmserve.v1.RateLimits: the one boundary that sees
those calls' gRPC errors. Every failure to reach the limits leaves as Unavailable, so a call
whose limits cannot be checked is refused (fail closed), never let through."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import grpc

from fmserve.core.context import remaining_s
from fmserve.errors import DeadlineExceeded, FmserveError, Unavailable
from fmserve.rpc.channels import open_channel
from fmserve.v1 import limits_pb2, limits_pb2_grpc

log = logging.getLogger("fmserve.gateway.limits")

UNREACHABLE = (
    "this API key's limits cannot be checked: the cache service or its Redis is unavailable, "
    "and calls by keys with limits are refused until it is back; retry shortly"
)


class LimitsClient:
    """Admit, release and renew calls against the shared limits. `start()` opens the channel."""

    def __init__(self, address: str, timeout_s: float, max_message_bytes: int) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self._channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        self._channel = open_channel(self.address, self.max_message_bytes)
        self._stub = limits_pb2_grpc.RateLimitsStub(self._channel)

    async def stop(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def admit(self, request: limits_pb2.AdmitRequest) -> limits_pb2.AdmitResponse:
        # What is left of the caller's deadline, at most timeout_s: a slow check is refused.
        timeout = remaining_s(self.timeout_s)
        reply: limits_pb2.AdmitResponse = await self._call(
            "Admit", request, timeout, callers_deadline=timeout < self.timeout_s
        )
        return reply

    async def release(self, key_id: str, call_id: str) -> None:
        request = limits_pb2.ReleaseRequest(key_id=key_id, call_id=call_id)
        await self._call("Release", request, self.timeout_s)

    async def renew(self, slots: Sequence[tuple[str, str]], lease_ms: int) -> None:
        wire = [limits_pb2.RenewSlotsRequest.Slot(key_id=k, call_id=c) for k, c in slots]
        request = limits_pb2.RenewSlotsRequest(slots=wire, lease_ms=lease_ms)
        await self._call("RenewSlots", request, self.timeout_s)

    async def _call(
        self, method: str, request: object, timeout: float, callers_deadline: bool = False
    ) -> Any:
        if self._channel is None:
            raise Unavailable(UNREACHABLE)
        try:
            return await getattr(self._stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, callers_deadline) from None


def _translate(exc: grpc.aio.AioRpcError, callers_deadline: bool) -> FmserveError:
    code = exc.code()
    if code is grpc.StatusCode.DEADLINE_EXCEEDED and callers_deadline:
        return DeadlineExceeded("the deadline expired while this API key's limits were checked")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(UNREACHABLE)
    # Anything else is the gateway's fault (a request the cache refused), not the client's.
    log.error("the cache service refused a limits call (%s): %s", code.name, exc.details())
    return FmserveError("the limits check failed")
