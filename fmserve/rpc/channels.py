"""Client channels between services: round-robin over every address of a service, retries of
UNAVAILABLE in the service config, the request id and trace carried on every call, and mTLS
when the process has a TLS identity."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import grpc

from fmserve.core import context, tracing
from fmserve.rpc.interceptors import REQUEST_ID_KEY
from fmserve.rpc.service import grpc_options
from fmserve.rpc.tls import Identity
from fmserve.v1 import tunnel_pb2

_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:")

SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            },
            # Not the tunnel's streams: replayed, they would run calls again unseen; the tunnel
            # sends a call its stream dropped again as a unary call, retried as above.
            {"name": [{"service": tunnel_pb2.DESCRIPTOR.services_by_name["Tunnel"].full_name}]},
        ],
        "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1},
    }
)


def target(address: str) -> str:
    """A gRPC target for one address or a comma-separated list of replicas.

    One `host:port` resolves through DNS, so every address the name has (compose replicas) is
    used and re-resolved; several `ip:port` entries become a static `ipv4:` list.
    """
    if address.startswith(_SCHEMES):
        return address
    parts = [a.strip() for a in address.split(",") if a.strip()]
    if len(parts) == 1:
        return f"dns:///{parts[0]}"
    return "ipv4:" + ",".join(_literal(p) for p in parts)


def _literal(address: str) -> str:
    host, _, port = address.rpartition(":")
    host = "127.0.0.1" if host == "localhost" else host
    ipaddress.IPv4Address(host)  # a list of replicas must name IPv4 addresses
    return f"{host}:{port}"


def outgoing_metadata() -> dict[str, str]:
    """What a downstream call carries: the request id and the trace context (`traceparent`)."""
    metadata = tracing.inject()
    if rid := context.request_id.get():
        metadata[REQUEST_ID_KEY] = rid
    return metadata


class PropagatingChannel(grpc.aio.Channel):
    """A channel whose every call, whatever its shape, carries the current request id and
    trace context. Its multicallables add the metadata themselves: an aio client interceptor
    would cost a task and a call object per call (~80 µs of CPU in-process)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel

    async def __aenter__(self) -> PropagatingChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._channel.close(None)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    def unary_unary(self, *args: Any, **kwargs: Any) -> grpc.aio.UnaryUnaryMultiCallable:
        return _UnaryUnary(self._channel.unary_unary(*args, **kwargs))

    def unary_stream(self, *args: Any, **kwargs: Any) -> grpc.aio.UnaryStreamMultiCallable:
        return _UnaryStream(self._channel.unary_stream(*args, **kwargs))

    def stream_unary(self, *args: Any, **kwargs: Any) -> grpc.aio.StreamUnaryMultiCallable:
        return _StreamUnary(self._channel.stream_unary(*args, **kwargs))

    def stream_stream(self, *args: Any, **kwargs: Any) -> grpc.aio.StreamStreamMultiCallable:
        return _StreamStream(self._channel.stream_stream(*args, **kwargs))


class _Carrying:
    """A multicallable whose calls add the request id and trace to their metadata."""

    def __init__(self, multicallable: Any) -> None:
        self._multicallable = multicallable

    def __call__(
        self, request: Any = None, timeout: float | None = None, metadata: Any = None, **kw: Any
    ) -> Any:
        """The request (or request iterator), timeout and metadata by position or by name, as
        the stream-request shapes take them."""
        if extra := outgoing_metadata():
            metadata = (*(metadata or ()), *extra.items())
        return self._multicallable(request, timeout=timeout, metadata=metadata, **kw)


class _UnaryUnary(_Carrying, grpc.aio.UnaryUnaryMultiCallable):
    pass


class _UnaryStream(_Carrying, grpc.aio.UnaryStreamMultiCallable):
    pass


class _StreamUnary(_Carrying, grpc.aio.StreamUnaryMultiCallable):
    pass


class _StreamStream(_Carrying, grpc.aio.StreamStreamMultiCallable):
    pass


# gRPC re-resolves a `dns:///` name when a connection fails or closes (a replica stopped, or
# its server's max connection age passed), but at most once per this interval; its default of
# 30 s would leave a replaced replica's new address unknown for that long.
DNS_MIN_RESOLUTION_INTERVAL_MS = 2_000


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Options of every channel to a service, tritonclient's included: limits, keepalive,
    round-robin with retries of UNAVAILABLE, and prompt DNS re-resolution."""
    return [
        *grpc_options(max_message_bytes),
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.dns_min_time_between_resolutions_ms", DNS_MIN_RESOLUTION_INTERVAL_MS),
        # A stage that restarts is reached again within a second of serving (gRPC's default
        # backoff grows to two minutes; until it reconnects, calls fail with UNAVAILABLE).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1_000),
    ]


def tls_options(address: str) -> list[tuple[str, Any]]:
    """Options a TLS channel adds. A replica list (`ipv4:a,b`) names no one host to check the
    server's certificate against, so it is checked against the first address: each replica's
    certificate must name it (those of `fmserve certs` name 127.0.0.1, as `fmserve up` lists)."""
    resolved = target(address)
    if not resolved.startswith("ipv4:"):
        return []
    first = resolved.removeprefix("ipv4:").split(",")[0].rpartition(":")[0]
    return [("grpc.ssl_target_name_override", first)]


def open_channel(
    address: str, max_message_bytes: int = 64 * 1024 * 1024, identity: Identity | None = None
) -> PropagatingChannel:
    """An asyncio channel to a service (one address or several replicas), whose calls carry
    the request id and trace; mTLS with `identity`, plaintext without."""
    return PropagatingChannel(bare_channel(address, max_message_bytes, identity))


def bare_channel(
    address: str, max_message_bytes: int, identity: Identity | None
) -> grpc.aio.Channel:
    """`open_channel`'s channel without the request id and trace on its calls."""
    options = channel_options(max_message_bytes)
    if identity is None:
        return grpc.aio.insecure_channel(target(address), options)
    credentials = identity.channel_credentials()
    tls = [*options, *tls_options(address)]
    return grpc.aio.secure_channel(target(address), credentials, tls)
