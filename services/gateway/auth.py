"""The auth interceptor: every public RPC of the gateway is authenticated (`authorization:
Bearer <key>` metadata → a `Principal`, keyring.py), authorized against the method's access rule
(access.py: deny by default), and admitted (the `Admission` seam: per-key limits) before its
handler runs; the principal is bound in `principal.current` for the handler (job ownership).
Health and reflection stay open. A streaming request (SubmitJob) is checked on its first
message, the header. The key is read from the metadata the service interceptor, outside this
one, bound for the call (one `authorization` header; a call with several is refused).

Refusals leave as Unauthenticated or PermissionDenied (the service interceptor, outside this
one, puts them on the wire) and are audited, as is every admin action. The key itself is never
logged, nor put in an error: only its key id and name.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from fmserve.core import apikeys
from fmserve.core import context as call_context
from fmserve.errors import FmserveError, InvalidInput, PermissionDenied, Unauthenticated
from fmserve.rpc.wrapping import MethodWrapper
from services.gateway import audit, scopes
from services.gateway.access import Access, AccessTable
from services.gateway.keyring import KeyRing
from services.gateway.principal import ADMITTED, Admission, Meter, Principal, current, meter

_SCHEME = "bearer "


class AuthInterceptor(MethodWrapper):
    def __init__(self, keyring: KeyRing, table: AccessTable, admission: Admission) -> None:
        super().__init__()
        self.keyring = keyring
        self.table = table
        self.admission = admission

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
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
            async with _Guard(self, method, request):
                return await behavior(request, context)

        return wrapped

    def _wrap_unary_stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _Guard(self, method, request):
                async for reply in behavior(request, context):
                    yield reply

        return wrapped

    def _wrap_stream_unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapped(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            first = await anext(aiter(requests), None)
            async with _Guard(self, method, first):
                return await behavior(_prepend(first, requests), context)

        return wrapped

    def _wrap_stream_stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapped(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            first = await anext(aiter(requests), None)
            async with _Guard(self, method, first):
                async for reply in behavior(_prepend(first, requests), context):
                    yield reply

        return wrapped

    def _access(self, method: str, request: Any, principal: Principal) -> Access:
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
        return access


class _Guard:
    """One call: authorize, bind the principal, admit; on the way out, release the admission
    and audit an admin action's outcome. A class, not a generator: it runs on every call."""

    def __init__(self, owner: AuthInterceptor, method: str, request: Any) -> None:
        self.owner, self.method, self.request = owner, method, request

    async def __aenter__(self) -> None:
        owner, api_key = self.owner, ""
        try:
            api_key = _bearer()
            # a busy key is known: no await, no lookup
            principal = owner.keyring.known(api_key) or await owner.keyring.authenticate(api_key)
        except Unauthenticated:
            audit.record(self.method, "UNAUTHENTICATED", apikeys.key_id_of(api_key) or "", "", {})
            raise
        self.principal = principal
        self.access = access = owner._access(self.method, self.request, principal)
        self.token = current.set(principal)
        metered = Meter() if access.metered else None
        self.meter_token = meter.set(metered)
        self.admitted = owner.admission.admit(principal, access.model, access.items, metered)
        if self.admitted is ADMITTED:
            return  # nothing held: no limits, or a token leased ahead
        try:
            await self.admitted.__aenter__()
        except BaseException as exc:
            self._unbind()
            if isinstance(exc, FmserveError):
                self._audit(exc.code.name)
            raise

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            if self.admitted is not ADMITTED:
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


def _bearer() -> str:
    """The key from `authorization: Bearer <key>`, or '' when there is none; Unauthenticated
    when the call carries more than one (which one would a proxy in front have checked?). Read
    from the metadata the service interceptor, outside this one, bound for the call."""
    metadata = call_context.metadata.get()
    if metadata is None:
        raise RuntimeError("the auth interceptor runs inside the service interceptor, not alone")
    values = [value for name, value in metadata if name == "authorization"]
    if len(values) > 1:
        raise Unauthenticated("send one `authorization` header, not several")
    value = values[0] if values else ""
    if isinstance(value, str) and value[: len(_SCHEME)].lower() == _SCHEME:
        return value[len(_SCHEME) :].strip()
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
