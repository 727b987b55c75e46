"""Who is calling: the authenticated `Principal`, the contextvar that carries it to the servicer,
and the `Admission` seam through which per-key limits (rate, concurrency, daily items) decide
whether an authorized call may run now."""

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


class Admission(Protocol):
    """Decides whether an authorized call may run now; entered around the whole call, so its
    exit runs on every path (success, error, cancel, deadline). `items` is how many texts the
    call brings (a job's declared size, 0 when not declared). Refusal raises an FmserveError
    (RESOURCE_EXHAUSTED for a limit, UNAVAILABLE when the limit cannot be checked)."""

    def admit(
        self, principal: Principal, model: str, items: int
    ) -> AbstractAsyncContextManager[None]: ...


class AdmitAll:
    """The default `Admission`: no limits (one shared no-op context, nothing per call)."""

    _NOTHING: AbstractAsyncContextManager[None] = contextlib.nullcontext()

    def admit(
        self, principal: Principal, model: str, items: int
    ) -> AbstractAsyncContextManager[None]:
        return self._NOTHING
