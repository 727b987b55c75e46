"""What the gateway's clients of the cache service's stores (KeyStore, TrafficPolicies) share:
the channel, and the one boundary that sees their calls' gRPC errors (they leave as fmserve
errors; an unreachable store says which one)."""

from __future__ import annotations

from typing import Any, ClassVar

import grpc

from fmserve.errors import Unavailable, from_rpc_error
from fmserve.rpc.channels import open_channel
from fmserve.rpc.tls import Identity

CALL_TIMEOUT_S = 2.0


class CacheServiceClient:
    """A store kept by the cache service. `start()` opens the channel."""

    unavailable: ClassVar[str]
    """What an UNAVAILABLE or timed-out call tells the caller."""

    def __init__(self, address: str, identity: Identity | None = None) -> None:
        self.address = address
        self._identity = identity
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    def stub(self, channel: grpc.aio.Channel) -> Any:
        """The store's generated stub on `channel`."""
        raise NotImplementedError

    async def start(self) -> None:
        self._channel = open_channel(self.address, identity=self._identity)
        self._stub = self.stub(self._channel)

    async def stop(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def _call(self, method: str, request: object) -> Any:
        try:
            return await getattr(self._stub, method)(request, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(self.unavailable) from None
            raise from_rpc_error(exc) from None
