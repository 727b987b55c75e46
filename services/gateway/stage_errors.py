"""How a stage's failure reaches the gateway's callers: `translated` turns a stage's gRPC error
into an fmserve error that names the stage, not its address. Used by the
stage clients (stages.py, streams.py), the one boundary that sees those errors."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from fmserve.errors import DeadlineExceeded, FmserveError, Unavailable, from_rpc_error

log = logging.getLogger("fmserve.gateway.stages")


# Only preprocess judges what a client sent; an INVALID_ARGUMENT from a later stage means the
# gateway sent it something wrong: a server fault, not the client's.
_JUDGES_INPUT = {"preprocess"}


@asynccontextmanager
async def translated(stage: str) -> AsyncIterator[None]:
    """Turn a stage's failure into an fmserve error that names the stage, not its address."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise _stage_error(stage, exc) from None


def _stage_error(stage: str, exc: grpc.aio.AioRpcError) -> FmserveError:
    code = exc.code()
    if code is grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"the {stage} stage is unavailable; retry shortly")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"the deadline expired while waiting for the {stage} stage")
    if code is grpc.StatusCode.INVALID_ARGUMENT and stage not in _JUDGES_INPUT:
        log.error("the %s stage refused what the gateway sent: %s", stage, exc.details())
        return FmserveError(f"the {stage} stage refused the gateway's request")
    return from_rpc_error(exc)
