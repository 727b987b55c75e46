"""Request-scoped values that follow a call through every hop: its id and its deadline; and
within a server, the call's request metadata. The server interceptor binds them; stage clients
read the id and deadline for each downstream call."""

from __future__ import annotations

import contextvars
import time

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
# Absolute time.monotonic() by which the caller wants its answer; None when it set no deadline.
deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)
# The request metadata of the call being served, as the server interceptor read it (each read of
# grpc's invocation_metadata() builds it anew, a measurable cost on a busy gateway); None
# outside a call, so that a layer reading it outside the server interceptor fails loudly.
Metadata = tuple[tuple[str, str | bytes], ...]
metadata: contextvars.ContextVar[Metadata | None] = contextvars.ContextVar("metadata", default=None)


def set_deadline_from(time_remaining: float | None) -> None:
    """Bind the caller's deadline, given the seconds it has left (None: no deadline)."""
    deadline.set(None if time_remaining is None else time.monotonic() + time_remaining)


def remaining_s(default: float) -> float:
    """Seconds a downstream call may take: what is left of the caller's deadline, capped by
    `default` (the stage's own timeout), and never negative."""
    until = deadline.get()
    if until is None:
        return default
    return max(0.0, min(default, until - time.monotonic()))
