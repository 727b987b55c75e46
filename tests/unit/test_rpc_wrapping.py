"""MethodWrapper: each method's handler is wrapped once and kept, not rebuilt on every call."""

from __future__ import annotations

import grpc
import pytest

from fmserve.rpc.wrapping import MethodWrapper


class Counting(MethodWrapper):
    def __init__(self) -> None:
        super().__init__()
        self.wrapped: list[str] = []

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        self.wrapped.append(method)
        return grpc.unary_unary_rpc_method_handler(handler.unary_unary)


class Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


async def answer(request: object, context: object) -> object:
    return request


def continuation_to(handler: grpc.RpcMethodHandler | None):  # type: ignore[no-untyped-def]
    async def continuation(_: object) -> grpc.RpcMethodHandler | None:
        return handler

    return continuation


async def intercept(
    interceptor: MethodWrapper, method: str, handler: grpc.RpcMethodHandler | None
) -> grpc.RpcMethodHandler | None:
    return await interceptor.intercept_service(continuation_to(handler), Details(method))  # type: ignore[arg-type]


async def test_a_method_is_wrapped_on_its_first_call_and_the_wrapper_kept() -> None:
    interceptor = Counting()
    handler = grpc.unary_unary_rpc_method_handler(answer)
    first = await intercept(interceptor, "/fmserve.v1.Gateway/Infer", handler)
    again = await intercept(interceptor, "/fmserve.v1.Gateway/Infer", handler)
    assert first is again and first is not handler
    assert interceptor.wrapped == ["Infer"]


async def test_a_changed_handler_is_wrapped_anew() -> None:
    async def other(request: object, context: object) -> object:
        return None

    interceptor = Counting()
    old = grpc.unary_unary_rpc_method_handler(answer)
    new = grpc.unary_unary_rpc_method_handler(other)
    await intercept(interceptor, "/fmserve.v1.Gateway/Infer", old)
    wrapped = await intercept(interceptor, "/fmserve.v1.Gateway/Infer", new)
    assert wrapped is not None and wrapped.unary_unary is other  # the new handler's behaviour
    assert interceptor.wrapped == ["Infer", "Infer"]


@pytest.mark.parametrize(
    "method",
    [
        "/grpc.health.v1.Health/Check",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ],
)
async def test_health_and_reflection_are_left_as_they_are(method: str) -> None:
    interceptor = Counting()
    handler = grpc.unary_unary_rpc_method_handler(answer)
    assert await intercept(interceptor, method, handler) is handler
    assert interceptor.wrapped == []


async def test_an_unknown_method_has_no_handler_and_is_not_kept() -> None:
    interceptor = Counting()
    assert await intercept(interceptor, "/fmserve.v1.Gateway/Nope", None) is None
    assert interceptor.wrapped == [] and interceptor._wrapped == {}
