"""Fake stage services for the gateway's tests: preprocess, inference (KServe v2), postprocess
and cache, each a real grpc.aio server on a free port behind the real service lifecycle and
interceptor (so a fake's error reaches the wire as a real stage's would), each recording the
calls it answers and able to fail, stall or wait on a gate.

Instead of a model they compute something a test can check by hand: a text's token ids are its
words' lengths, the "model" answers [sum of the ids, number of ids] per text, and postprocess
turns that row into the text's embedding (or its labels, best first: `sum=<sum>` and then
`label1` … `label<N-1>` of `CLASSIFIER_LABELS`, cut to the request's top_k as the real
postprocess cuts them). So "a bb ccc" comes back as [6, 3], or with the top label "sum=6".
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from fmserve.core import tensors
from fmserve.core.settings import ServiceSettings
from fmserve.errors import FmserveError, InputTooLong
from fmserve.rpc.interceptors import REQUEST_ID_KEY
from fmserve.rpc.service import Service, Servicer
from fmserve.v1 import (
    cache_pb2,
    cache_pb2_grpc,
    common_pb2,
    postprocess_pb2,
    postprocess_pb2_grpc,
    preprocess_pb2,
    preprocess_pb2_grpc,
)
from services.gateway.settings import GatewaySettings

CLASSIFIER_LABELS = 1000
"""How many labels the fake classifier answers per text when top_k asks for all of them."""

REFUSED_WORD = "refuse"
"""A text with this word is one preprocess refuses (InputTooLong), as a real one refuses a text
over the model's length."""


def expected(text: str) -> list[float]:
    """What the fakes answer for a text: [sum of its words' lengths, number of words]."""
    lengths = [len(word) for word in text.split()]
    return [float(sum(lengths)), float(len(lengths))]


@dataclass
class Call:
    """One call a fake answered: its request, and what the caller sent with it."""

    request: Any
    request_id: str
    time_left_s: float | None


@dataclass
class Stage:
    """A fake stage's record and behaviour; tests change the behaviour between calls."""

    calls: list[Call] = field(default_factory=list)
    error: FmserveError | None = None
    """Raised on every call while set (through the interceptor, as a real stage raises)."""
    delay_s: float = 0.0
    gate: asyncio.Event | None = None
    """While set to an unset event, every call waits for it before answering."""

    async def answer(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        request_id = str(metadata.get(REQUEST_ID_KEY, ""))
        self.calls.append(Call(request, request_id, context.time_remaining()))
        if self.gate is not None:
            await self.gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error


class FakePreprocess(preprocess_pb2_grpc.PreprocessServicer):
    def __init__(self, stage: Stage) -> None:
        self.stage = stage

    async def Tokenize(
        self, request: preprocess_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> preprocess_pb2.TokenizeResponse:
        await self.stage.answer(request, context)
        for i, text in enumerate(request.texts):
            if REFUSED_WORD in text.split():
                raise InputTooLong(f"texts[{i}] is over {request.model}'s maximum length")
        ids = [[len(word) for word in text.split()] for text in request.texts]
        flat = np.array([i for row in ids for i in row], dtype=np.int64)
        response = preprocess_pb2.TokenizeResponse(
            input_ids=tensors.to_wire(flat),
            lengths=tensors.to_wire(np.array([len(row) for row in ids], dtype=np.int32)),
        )
        if request.return_offsets:
            response.offsets.CopyFrom(tensors.to_wire(np.zeros((len(flat), 2), dtype=np.int32)))
        return response


class FakeInference(service_pb2_grpc.GRPCInferenceServiceServicer):
    """ModelInfer only: the KServe v2 method the gateway calls."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage

    async def ModelInfer(
        self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelInferResponse:
        await self.stage.answer(request, context)
        raw = dict(zip((i.name for i in request.inputs), request.raw_input_contents, strict=True))
        ids = np.frombuffer(raw["input_ids"], dtype="<i8")
        lengths = np.frombuffer(raw["lengths"], dtype="<i4")
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int)
        rows = np.array(
            [[ids[s : s + n].sum(), n] for s, n in zip(starts, lengths, strict=True)],
            dtype="<f4",
        ).reshape(len(lengths), 2)
        (requested,) = request.outputs
        output = service_pb2.ModelInferResponse.InferOutputTensor(
            name=requested.name, datatype="FP32", shape=rows.shape
        )
        return service_pb2.ModelInferResponse(
            model_name=request.model_name,
            model_version=request.model_version,
            outputs=[output],
            raw_output_contents=[rows.tobytes()],
        )


class FakePostprocess(postprocess_pb2_grpc.PostprocessServicer):
    def __init__(self, stage: Stage) -> None:
        self.stage = stage

    async def Postprocess(
        self, request: postprocess_pb2.PostprocessRequest, context: grpc.aio.ServicerContext
    ) -> postprocess_pb2.PostprocessResponse:
        await self.stage.answer(request, context)
        rows = tensors.to_domain(request.output, "output")
        return postprocess_pb2.PostprocessResponse(
            results=[_result(request.task, row, request.top_k) for row in rows]
        )


def _result(task: int, row: np.ndarray, top_k: int) -> common_pb2.Result:
    if task == common_pb2.TASK_EMBEDDING:
        return common_pb2.Result(embedding=common_pb2.Embedding(values=row.tolist()))
    names = [f"sum={row[0]:g}", *(f"label{i}" for i in range(1, CLASSIFIER_LABELS))]
    count = min(top_k, CLASSIFIER_LABELS) if top_k > 0 else CLASSIFIER_LABELS
    labels = [
        common_pb2.LabelScore(label=name, score=1.0 - i / CLASSIFIER_LABELS)
        for i, name in enumerate(names[:count])
    ]
    return common_pb2.Result(classification=common_pb2.Classification(labels=labels))


class FakeCache(cache_pb2_grpc.CacheServicer):
    """Lookup and Store over a dict; a result read back is marked `cached`, as the real one's."""

    def __init__(self, stage: Stage, stored: dict[str, common_pb2.Result]) -> None:
        self.stage = stage
        self.stored = stored

    async def Lookup(
        self, request: cache_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.LookupResponse:
        await self.stage.answer(request, context)
        return cache_pb2.LookupResponse(entries=[self._entry(key) for key in request.keys])

    def _entry(self, key: str) -> cache_pb2.CacheEntry:
        if key not in self.stored:
            return cache_pb2.CacheEntry(found=False)
        result = common_pb2.Result()
        result.CopyFrom(self.stored[key])
        result.cached = True
        return cache_pb2.CacheEntry(found=True, result=result)

    async def Store(
        self, request: cache_pb2.StoreRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.StoreResponse:
        await self.stage.answer(request, context)
        for item in request.items:
            self.stored[item.key] = item.result
        return cache_pb2.StoreResponse(stored=len(request.items))


@dataclass
class Fakes:
    """The four fake stages, where each listens, and what the cache holds."""

    preprocess: Stage = field(default_factory=Stage)
    inference: Stage = field(default_factory=Stage)
    postprocess: Stage = field(default_factory=Stage)
    cache: Stage = field(default_factory=Stage)
    stored: dict[str, common_pb2.Result] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def settings(self, **overrides: Any) -> GatewaySettings:
        """Gateway settings that address the fakes (an override may point one elsewhere)."""
        addresses = {f"{name}_address": f"127.0.0.1:{port}" for name, port in self.ports.items()}
        return GatewaySettings(**{**addresses, **overrides})

    def servicers(self) -> dict[str, Servicer]:
        return {
            "preprocess": Servicer(
                preprocess_pb2_grpc.add_PreprocessServicer_to_server,
                FakePreprocess(self.preprocess),
                "fmserve.v1.Preprocess",
            ),
            "inference": Servicer(
                service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
                FakeInference(self.inference),
                "inference.GRPCInferenceService",
            ),
            "postprocess": Servicer(
                postprocess_pb2_grpc.add_PostprocessServicer_to_server,
                FakePostprocess(self.postprocess),
                "fmserve.v1.Postprocess",
            ),
            "cache": Servicer(
                cache_pb2_grpc.add_CacheServicer_to_server,
                FakeCache(self.cache, self.stored),
                "fmserve.v1.Cache",
            ),
        }


@asynccontextmanager
async def fake_stages() -> AsyncIterator[Fakes]:
    """The four fakes serving, each on its own free port; stopped on exit (calls still waiting
    on a gate are cut after a short grace)."""
    fakes = Fakes()
    settings = ServiceSettings(host="127.0.0.1", port=0, metrics_port=-1, grace_period_s=0.2)
    async with AsyncExitStack() as stack:
        for name, servicer in fakes.servicers().items():
            service = Service(f"fake_{name}", settings, [servicer])
            await service.start()
            stack.push_async_callback(service.stop)
            fakes.ports[name] = service.port
        yield fakes


def closed_port_address() -> str:
    """An address where nothing listens: a port the OS handed out and that was closed again."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"
