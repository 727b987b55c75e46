"""The Python client: `Client` and `AsyncClient` are twins with the same methods.

    from fmserve import Client
    with Client("localhost:50051") as c:
        vectors = c.embed(["a sentence"], model="minilm-embed")     # numpy [N, 384]
        labels = c.classify(["I love it"], model="minilm-sentiment")  # best first

gRPC failures arrive as `fmserve.errors` exceptions (see that module's tree)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from fmserve.errors import from_rpc_error
from fmserve.service import grpc_options
from fmserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

TASKS = {
    "embedding": common_pb2.TASK_EMBEDDING,
    "text-classification": common_pb2.TASK_TEXT_CLASSIFICATION,
    "token-classification": common_pb2.TASK_TOKEN_CLASSIFICATION,
}
TASK_NAMES = {wire: name for name, wire in TASKS.items()}
CACHE_POLICIES = {
    "use": common_pb2.CACHE_POLICY_USE,
    "bypass": common_pb2.CACHE_POLICY_BYPASS,
    "refresh": common_pb2.CACHE_POLICY_REFRESH,
}
_MAX_MESSAGE = 256 * 1024 * 1024


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float


@dataclass(frozen=True)
class Entity:
    label: str
    score: float
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class ModelInfo:
    name: str
    task: str
    versions: list[str]
    max_length: int
    labels: list[str]
    dimensions: int
    description: str


@dataclass
class Answer:
    """Everything the gateway said about one Infer call."""

    model: str
    version: str
    task: str
    results: list[Any] = field(default_factory=list)
    """Per text: a numpy vector, a list of LabelScore, or a list of Entity."""
    cached: list[bool] = field(default_factory=list)

    @property
    def cache_hit(self) -> bool:
        return bool(self.cached) and all(self.cached)


def _request(
    texts: str | Sequence[str],
    model: str,
    task: str | None,
    version: str,
    truncate: bool,
    top_k: int,
    cache: str,
) -> gateway_pb2.InferRequest:
    if isinstance(texts, str):
        texts = [texts]
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {sorted(TASKS)}")
    if cache not in CACHE_POLICIES:
        raise ValueError(f"unknown cache policy {cache!r}; use one of {sorted(CACHE_POLICIES)}")
    options = gateway_pb2.InferOptions(
        truncate=truncate, top_k=top_k, cache_policy=CACHE_POLICIES[cache]
    )
    return gateway_pb2.InferRequest(
        model=model,
        version=version,
        task=TASKS[task] if task else common_pb2.TASK_UNSPECIFIED,
        texts=list(texts),
        options=options,
    )


def _result(result: common_pb2.Result) -> Any:
    kind = result.WhichOneof("value")
    if kind == "embedding":
        return np.asarray(result.embedding.values, dtype=np.float32)
    if kind == "classification":
        return [LabelScore(s.label, s.score) for s in result.classification.labels]
    return [Entity(e.label, e.score, e.start, e.end, e.text) for e in result.entities.entities]


def _answer(reply: gateway_pb2.InferResponse) -> Answer:
    return Answer(
        model=reply.model,
        version=reply.version,
        task=TASK_NAMES.get(reply.task, "unspecified"),
        results=[_result(r) for r in reply.results],
        cached=[r.cached for r in reply.results],
    )


def _model(info: gateway_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        info.name,
        TASK_NAMES.get(info.task, "unspecified"),
        list(info.versions),
        info.max_length,
        list(info.labels),
        info.dimensions,
        info.description,
    )


def _options() -> list[tuple[str, Any]]:
    return grpc_options(_MAX_MESSAGE)


class Client:
    """Blocking client for the gateway."""

    def __init__(self, address: str = "localhost:50051", *, timeout: float = 30.0) -> None:
        self._channel = grpc.insecure_channel(address, options=_options())
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self.timeout = timeout

    def infer(
        self,
        texts: str | Sequence[str],
        model: str,
        *,
        task: str | None = None,
        version: str = "",
        truncate: bool = False,
        top_k: int = 0,
        cache: str = "use",
    ) -> Answer:
        """Run `model` on `texts`; `cache` is "use", "bypass" or "refresh"."""
        request = _request(texts, model, task, version, truncate, top_k, cache)
        try:
            return _answer(self._stub.Infer(request, timeout=self.timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def embed(
        self, texts: str | Sequence[str], model: str = "minilm-embed", **options: Any
    ) -> np.ndarray:
        """One vector per text: a float32 array [N, dimensions]."""
        return np.stack(self.infer(texts, model, task="embedding", **options).results)

    def classify(
        self, texts: str | Sequence[str], model: str, **options: Any
    ) -> list[list[LabelScore]]:
        """Per text, its labels with scores, best first (`top_k=` keeps the best k)."""
        return self.infer(texts, model, task="text-classification", **options).results

    def entities(
        self, texts: str | Sequence[str], model: str, **options: Any
    ) -> list[list[Entity]]:
        """Per text, the labelled spans found in it, with character offsets."""
        return self.infer(texts, model, task="token-classification", **options).results

    def models(self) -> list[ModelInfo]:
        try:
            reply = self._stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return [_model(m) for m in reply.models]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client for the gateway: `Client`'s twin, every call awaited."""

    def __init__(self, address: str = "localhost:50051", *, timeout: float = 30.0) -> None:
        self._channel = grpc.aio.insecure_channel(address, options=_options())
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self.timeout = timeout

    async def infer(
        self,
        texts: str | Sequence[str],
        model: str,
        *,
        task: str | None = None,
        version: str = "",
        truncate: bool = False,
        top_k: int = 0,
        cache: str = "use",
    ) -> Answer:
        """Run `model` on `texts`; `cache` is "use", "bypass" or "refresh"."""
        request = _request(texts, model, task, version, truncate, top_k, cache)
        try:
            return _answer(await self._stub.Infer(request, timeout=self.timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def embed(
        self, texts: str | Sequence[str], model: str = "minilm-embed", **options: Any
    ) -> np.ndarray:
        """One vector per text: a float32 array [N, dimensions]."""
        return np.stack((await self.infer(texts, model, task="embedding", **options)).results)

    async def classify(
        self, texts: str | Sequence[str], model: str, **options: Any
    ) -> list[list[LabelScore]]:
        """Per text, its labels with scores, best first (`top_k=` keeps the best k)."""
        return (await self.infer(texts, model, task="text-classification", **options)).results

    async def entities(
        self, texts: str | Sequence[str], model: str, **options: Any
    ) -> list[list[Entity]]:
        """Per text, the labelled spans found in it, with character offsets."""
        return (await self.infer(texts, model, task="token-classification", **options)).results

    async def models(self) -> list[ModelInfo]:
        try:
            reply = await self._stub.ListModels(
                gateway_pb2.ListModelsRequest(), timeout=self.timeout
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return [_model(m) for m in reply.models]

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
