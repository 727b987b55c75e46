"""The gateway's clients for the four stage services. This module is the one boundary that
sees their gRPC (and tritonclient) errors, and translates them into fmserve errors."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import grpc
import tritonclient.grpc.aio as triton
from tritonclient.utils import InferenceServerException

from fmserve.core import tensors
from fmserve.core.tasks import TASK_TO_WIRE, TaskName
from fmserve.errors import DeadlineExceeded, FmserveError, Unavailable, from_rpc_error
from fmserve.rpc import tls
from fmserve.rpc.channels import (
    channel_options,
    open_channel,
    outgoing_metadata,
    target,
    tls_options,
)
from fmserve.v1 import (
    cache_pb2,
    cache_pb2_grpc,
    common_pb2,
    postprocess_pb2,
    postprocess_pb2_grpc,
    preprocess_pb2,
    preprocess_pb2_grpc,
)
from services.gateway.routes import Route
from services.gateway.settings import GatewaySettings

log = logging.getLogger("fmserve.gateway.stages")

OUTPUT_NAME = {TaskName.EMBEDDING: "embeddings"}  # every other task answers "logits"


# Only preprocess judges what a client sent; an INVALID_ARGUMENT from a later stage means the
# gateway sent it something wrong: a server fault, not the client's.
_JUDGES_INPUT = {"preprocess"}


@asynccontextmanager
async def _translated(stage: str) -> AsyncIterator[None]:
    """Turn a stage's failure into an fmserve error that names the stage, not its address."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise _stage_error(stage, exc) from None
    except InferenceServerException as exc:
        code = grpc.StatusCode[str(exc.status() or "StatusCode.UNKNOWN").split(".")[-1]]
        error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), exc.message())
        raise _stage_error(stage, error) from None


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


class StageClients:
    """Owns the channels to preprocess, inference, postprocess and cache."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._channels: list[grpc.aio.Channel] = []

    async def start(self) -> None:
        s = self.settings
        self._identity = tls.load(s)
        self._preprocess = preprocess_pb2_grpc.PreprocessStub(self._open(s.preprocess_address))
        self._postprocess = postprocess_pb2_grpc.PostprocessStub(self._open(s.postprocess_address))
        self._cache = cache_pb2_grpc.CacheStub(self._open(s.cache_address))
        self._inference = self._triton(s.inference_address)

    def _triton(self, address: str) -> triton.InferenceServerClient:
        """tritonclient opens its own channel: same options, and mTLS when on."""
        options = channel_options(self.settings.max_message_bytes)
        if self._identity is None:
            return triton.InferenceServerClient(target(address), channel_args=options)
        return triton.InferenceServerClient(
            target(address),
            creds=self._identity.channel_credentials(),
            channel_args=[*options, *tls_options(address)],
        )

    def _open(self, address: str) -> grpc.aio.Channel:
        channel = open_channel(address, self.settings.max_message_bytes, self._identity)
        self._channels.append(channel)
        return channel

    async def stop(self) -> None:
        for channel in self._channels:
            await channel.close()
        if hasattr(self, "_inference"):
            await self._inference.close()

    async def tokenize(
        self, route: Route, texts: list[str], timeout: float
    ) -> preprocess_pb2.TokenizeResponse:
        request = preprocess_pb2.TokenizeRequest(
            model=route.model,
            version=route.version,
            texts=texts,
            truncate=route.truncate,
            return_offsets=route.task.needs_offsets,
        )
        async with _translated("preprocess"):
            return await self._preprocess.Tokenize(request, timeout=timeout)

    async def infer(
        self, route: Route, tokens: preprocess_pb2.TokenizeResponse, timeout: float, priority: int
    ) -> common_pb2.Tensor:
        inputs = [
            _triton_input("input_ids", tokens.input_ids),
            _triton_input("lengths", tokens.lengths),
        ]
        output = OUTPUT_NAME.get(route.task, "logits")
        async with _translated("inference"):
            result = await self._inference.infer(
                route.model,
                inputs,
                model_version=route.version,
                outputs=[triton.InferRequestedOutput(output)],
                priority=priority,
                client_timeout=timeout,
                # tritonclient opens its own channel: the request id and trace travel as headers.
                headers=outgoing_metadata(),
            )
        response = result.get_response()
        index = [o.name for o in response.outputs].index(output)
        shape = response.outputs[index].shape
        return common_pb2.Tensor(
            dtype="FP32", shape=shape, data=response.raw_output_contents[index]
        )

    async def postprocess(
        self,
        route: Route,
        texts: list[str],
        tokens: preprocess_pb2.TokenizeResponse,
        output: common_pb2.Tensor,
        timeout: float,
        top_k: Sequence[int] | None = None,
    ) -> list[common_pb2.Result]:
        """One result per text. `top_k` is per text (texts of one batch may come from requests
        asking different values); None: the route's for every text."""
        top_ks = list(top_k) if top_k is not None else [route.top_k] * len(texts)
        request = postprocess_pb2.PostprocessRequest(
            model=route.model,
            version=route.version,
            task=TASK_TO_WIRE[route.task],
            output=output,
            top_k=_widest(top_ks),
        )
        if route.task.postprocess_needs_tokens:
            request.texts.extend(texts)
            request.lengths.CopyFrom(tokens.lengths)
            request.offsets.CopyFrom(tokens.offsets)
        async with _translated("postprocess"):
            reply = await self._postprocess.Postprocess(request, timeout=timeout)
        results = list(reply.results)
        # Not strict: the batcher reports a wrong count of results, as an error for the batch.
        for result, k in zip(results, top_ks, strict=False):
            if k > 0 and result.HasField("classification"):
                del result.classification.labels[k:]
        return results

    async def lookup(self, keys: list[str], timeout: float) -> list[common_pb2.Result | None]:
        request = cache_pb2.LookupRequest(keys=keys)
        async with _translated("cache"):
            reply = await self._cache.Lookup(request, timeout=timeout)
        return [entry.result if entry.found else None for entry in reply.entries]

    async def store(self, items: list[tuple[str, common_pb2.Result]], timeout: float) -> None:
        request = cache_pb2.StoreRequest(
            items=[cache_pb2.StoreItem(key=k, result=r) for k, r in items],
            ttl_s=self.settings.cache_ttl_s,
        )
        async with _translated("cache"):
            await self._cache.Store(request, timeout=timeout)


def _widest(top_ks: list[int]) -> int:
    """The one top_k that serves every text: all labels (0) if one text wants them all, else
    the largest. Each text is then cut to its own: labels come best first in a stable order
    (ties keep label order), so the first k of a longer answer are what k would have given.
    One call per batch; grouping the texts by value would pay a call per distinct value."""
    return 0 if 0 in top_ks else max(top_ks, default=0)


def _triton_input(name: str, tensor: common_pb2.Tensor) -> triton.InferInput:
    infer_input = triton.InferInput(name, list(tensor.shape), tensor.dtype)
    infer_input.set_data_from_numpy(tensors.to_domain(tensor, name))
    return infer_input
