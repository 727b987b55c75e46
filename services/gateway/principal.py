"""Who is calling: the authenticated `Principal`, the contextvar that carries it to the servicer,
the `Admission` seam through which per-key limits (rate, concurrency, daily items) decide
whether an authorized call may run now, and the `Meter` through which a call that reserved
more items than it may use (a generation: its max_new_tokens) says what it spent."""

from __future__ import annotations

import contextlib
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Principal:
    """An API key as the gateway sees it once verified (never the key's secret).

    Limits of 0 mean unlimited."""

    key_id: str
    name: str
    scopes: tuple[str, ...]
    admin: bool
    rpm: int = 0
    max_concurrency: int = 0
    daily_items: int = 0


# The caller of the current RPC; None when auth is off (every caller is then anonymous).
current: ContextVar[Principal | None] = ContextVar("fmserve_principal", default=None)


class Meter:
    """What a metered call spent of the items its admission reserved (a generation's tokens)."""

    def __init__(self) -> None:
        self.spent = 0


# The current call's meter; None when the call is not metered (or auth is off).
meter: ContextVar[Meter | None] = ContextVar("fmserve_meter", default=None)


def spend(items: int) -> None:
    """Count items the current call spent (a generation's tokens, as they are produced)."""
    if (metered := meter.get()) is not None:
        metered.spent += items


class Admission(Protocol):
    """Decides whether an authorized call may run now; entered around the whole call, so its
    exit runs on every path (success, error, cancel, deadline). `items` is how many texts the
    call brings (a job's declared size, 0 when not declared). Refusal raises an FmserveError
    (RESOURCE_EXHAUSTED for a limit, UNAVAILABLE when the limit cannot be checked).
    With a `metered` meter, `items` is a reserve: the exit gives back what the meter did not
    count (on every path)."""

    def admit(
        self, principal: Principal, model: str, items: int, metered: Meter | None = None
    ) -> AbstractAsyncContextManager[None]: ...


ADMITTED: AbstractAsyncContextManager[None] = contextlib.nullcontext()
"""What `admit` returns for a call admitted with nothing to hold or give back: the caller may
skip entering it (one shared object, nothing per call)."""


class AdmitAll:
    """The default `Admission`: no limits."""

    def admit(
        self, principal: Principal, model: str, items: int, metered: Meter | None = None
    ) -> AbstractAsyncContextManager[None]:
        return ADMITTED
