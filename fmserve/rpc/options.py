"""gRPC options that clients and servers share. Imports grpc only: the client uses it too."""

from __future__ import annotations

from typing import Any


def grpc_options(
    max_message_bytes: int, max_receive_bytes: int | None = None
) -> list[tuple[str, Any]]:
    """Channel/server options both sides use: message limits (receiving as much as sending,
    unless told otherwise) and keepalive that survives idling."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_receive_bytes or max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
