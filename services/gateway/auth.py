"""The auth interceptor: every public RPC of the gateway is authenticated (`authorization:
Bearer <key>` metadata → a `Principal`, keyring.py), authorized against the method's access rule
(access.py: deny by default), and admitted (the `Admission` seam: per-key limits) before its
handler runs; the principal is bound in `principal.current` for the handler (job ownership).
Health and reflection stay open. A streaming request (SubmitJob) is checked on its first
message, the header.

Refusals leave as Unauthenticated or PermissionDenied (the service interceptor, outside this
one, puts them on the wire) and are audited, as is every admin action. The key itself is never
logged, nor put in an error: only its key id and name.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from fmserve.core import apikeys
from fmserve.errors import FmserveError, InvalidInput, PermissionDenied, Unauthenticated
from services.gateway import audit, scopes
from services.gateway.access import Access, AccessTable
from services.gateway.keyring import KeyRing
from services.gateway.principal import Admission, Meter, Principal, current, meter

_OPEN = ("/grpc.health", "/grpc.reflection")
_SCHEME = "bearer "


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keyring: KeyRing, table: AccessTable, admission: Admission) -> None:
        self.keyring = keyring
        self.table = table
        self.admission = admission

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        kind, behavior = _behavior(handler)
        wrap = getattr(self, f"_wrap_{kind}")
        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(
            wrap(behavior, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap_unary_unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._guarded(method, request, context):
                return await behavior(request, context)

        return wrapped

    def _wrap_unary_stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._guarded(method, request, context):
                async for reply in behavior(request, context):
                    yield reply

        return wrapped

    def _wrap_stream_unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapped(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            first = await anext(aiter(requests), None)
            async with self._guarded(method, first, context):
                return await behavior(_prepend(first, requests), context)

        return wrapped

    def _wrap_stream_stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapped(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            first = await anext(aiter(requests), None)
            async with self._guarded(method, first, context):
                async for reply in behavior(_prepend(first, requests), context):
                    yield reply

        return wrapped

    def _guarded(self, method: str, request: Any, context: Any) -> _Guard:
        return _Guard(self, method, request, context)

    async def _authorize(self, method: str, request: Any, api_key: str) -> tuple[Principal, Access]:
        try:
            principal = await self.keyring.authenticate(api_key)
        except Unauthenticated:
            claimed = apikeys.key_id_of(api_key) or ""
            audit.record(method, "UNAUTHENTICATED", claimed, "", {})
            raise
        try:
            access = self.table.access(method, request)
        except PermissionDenied:
            audit.record(method, "PERMISSION_DENIED", principal.key_id, principal.name, {})
            raise
        for needed in access.scopes:
            if not scopes.allows(principal.scopes, needed):
                audit.record(
                    method, "PERMISSION_DENIED", principal.key_id, principal.name, access.asked
                )
                raise PermissionDenied(
                    f"the API key {principal.name!r} lacks the scope {needed!r} that {method} "
                    "needs here; ask an admin for a key with it"
                )
        if principal.daily_items and not access.counted:
            audit.record(method, "INVALID_ARGUMENT", principal.key_id, principal.name, access.asked)
            raise InvalidInput(
                f"the API key {principal.name!r} has a daily quota, so a job must say how many "
                "texts it sends (expected_items in its header; the Python client and the CLI do)"
            )
        return principal, access


class _Guard:
    """One call: authorize, bind the principal, admit; on the way out, release the admission
    and audit an admin action's outcome. A class, not a generator: it runs on every call."""

    def __init__(self, owner: AuthInterceptor, method: str, request: Any, context: Any) -> None:
        self.owner, self.method, self.request, self.context = owner, method, request, context

    async def __aenter__(self) -> None:
        api_key = _bearer(self.context)
        self.principal, self.access = await self.owner._authorize(
            self.method, self.request, api_key
        )
        self.token = current.set(self.principal)
        access = self.access
        metered = Meter() if access.metered else None
        self.meter_token = meter.set(metered)
        self.admitted = self.owner.admission.admit(
            self.principal, access.model, access.items, metered
        )
        try:
            await self.admitted.__aenter__()
        except BaseException as exc:
            self._unbind()
            if isinstance(exc, FmserveError):
                self._audit(exc.code.name)
            raise

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            await self.admitted.__aexit__(*exc_info)
        finally:
            self._unbind()
            if scopes.ADMIN in self.access.scopes:
                self._audit("OK" if exc_info[1] is None else _code(exc_info[1]))

    def _unbind(self) -> None:
        meter.reset(self.meter_token)
        current.reset(self.token)

    def _audit(self, outcome: str) -> None:
        p = self.principal
        audit.record(self.method, outcome, p.key_id, p.name, self.access.asked)


def _behavior(handler: grpc.RpcMethodHandler) -> tuple[str, Callable[..., Any]]:
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        if behavior := getattr(handler, kind):
            return kind, behavior
    raise ValueError("a method handler without a behavior")


def _bearer(context: Any) -> str:
    """The key from `authorization: Bearer <key>`, or '' when there is none."""
    for name, value in context.invocation_metadata() or ():
        if name == "authorization" and isinstance(value, str):
            return value[len(_SCHEME) :].strip() if value.lower().startswith(_SCHEME) else ""
    return ""


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is not None:
        yield first
    async for message in rest:
        yield message


def _code(exc: BaseException) -> str:
    if isinstance(exc, FmserveError):
        return exc.code.name
    return "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "INTERNAL"
