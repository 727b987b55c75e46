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
            }
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


class _PropagatingInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor
):
    """Carries the current request id and trace context on every call."""

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_propagating(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_propagating(details), request)


def outgoing_metadata() -> dict[str, str]:
    """What a downstream call carries: the request id and the trace context (`traceparent`)."""
    metadata = tracing.inject()
    if rid := context.request_id.get():
        metadata[REQUEST_ID_KEY] = rid
    return metadata


def _propagating(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    extra = outgoing_metadata()
    if not extra:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()), *extra.items())
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


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
) -> grpc.aio.Channel:
    """An asyncio channel to a service (one address or several replicas); mTLS with
    `identity`, plaintext without."""
    options = channel_options(max_message_bytes)
    interceptors = [_PropagatingInterceptor()]
    if identity is None:
        return grpc.aio.insecure_channel(target(address), options, interceptors=interceptors)
    return grpc.aio.secure_channel(
        target(address),
        identity.channel_credentials(),
        [*options, *tls_options(address)],
        interceptors=interceptors,
    )
