"""The shape every fmserve server interceptor has: each method's handler wrapped with the same
behaviour, health and reflection left as they are.

A method's wrapped handler is built on its first call and kept: grpc.aio asks each interceptor
for the handler on every call, and rebuilding the wrapper each time (closure, handler tuple,
the lookups to pick them) was a measurable part of a cache hit's CPU. Kept per method name, and
rebuilt only if the handler beneath it changes, so the table holds one entry per method the
server serves (a call to an unknown method has no handler and is never kept).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from fmserve.v1 import tunnel_pb2

_TUNNEL = tunnel_pb2.DESCRIPTOR.services_by_name["Tunnel"].full_name
UNWRAPPED = ("/grpc.health", "/grpc.reflection", f"/{_TUNNEL}/")
"""Left unwrapped. Health and reflection: probes and tooling must reach them whatever the other
interceptors do. The tunnel: a stream of it is transport, not a call (counted in flight, it
would hold the autoscalers' signal up for as long as it stays open); each call it carries is
wrapped as its unary call is (fmserve/rpc/tunnel_server.py)."""


class MethodWrapper(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        path = details.method
        known = self._wrapped.get(path)
        if known is None or known[0] is not handler:
            wrapped = handler
            if not path.startswith(UNWRAPPED):
                wrapped = self.wrap(handler, path.rsplit("/", 1)[-1])
            known = self._wrapped[path] = (handler, wrapped)
        return known[1]

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The handler of `method` (its bare name, e.g. "Infer") with this interceptor's
        behaviour around it."""
        raise NotImplementedError
