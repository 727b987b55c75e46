"""The Python client: `Client` and `AsyncClient` are twins with the same methods.

    from fmserve import Client
    with Client("localhost:50051") as c:
        vectors = c.embed(["a sentence"], model="minilm-embed")     # numpy [N, 384]
        labels = c.classify(["I love it"], model="minilm-sentiment")  # best first

Batch jobs: submit any iterable of texts (streamed to the gateway in chunks), then wait, read:

        job = c.submit(open_texts(), model="minilm-embed")   # returns once the job is durable
        job.wait(progress=True)                              # a progress bar with rate and ETA
        for item in job.results():                           # item order, fetched page by page
            print(item.index, item.result if item.ok else item.error)

gRPC failures arrive as `fmserve.errors` exceptions (see that module's tree)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from fmserve.errors import from_rpc_error
from fmserve.service import grpc_options
from fmserve.tasks import TASK_TO_WIRE
from fmserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, jobs_pb2

TASKS = {task.value: wire for task, wire in TASK_TO_WIRE.items()}
TASK_NAMES = {wire: name for name, wire in TASKS.items()}
CACHE_POLICIES = {
    "use": common_pb2.CACHE_POLICY_USE,
    "bypass": common_pb2.CACHE_POLICY_BYPASS,
    "refresh": common_pb2.CACHE_POLICY_REFRESH,
}
PRIORITIES = {
    "normal": jobs_pb2.JOB_PRIORITY_NORMAL,
    "high": jobs_pb2.JOB_PRIORITY_HIGH,
    "low": jobs_pb2.JOB_PRIORITY_LOW,
}
PRIORITY_NAMES = {wire: name for name, wire in PRIORITIES.items()}
TERMINAL_STATES = ("succeeded", "failed", "cancelled", "expired")
_MAX_MESSAGE = 256 * 1024 * 1024
_CHUNK = 500  # texts per SubmitJob message: small messages, few of them
_PAGE = 1000  # items per results page


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
    trace_id: str = ""
    """The request's distributed trace, when the cluster exports traces."""

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
        trace_id=reply.trace_id,
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


@dataclass(frozen=True)
class JobStatus:
    """A job's state and progress. Times are Unix seconds (0: not yet)."""

    id: str
    state: str
    """queued, running, succeeded, failed, cancelled or expired (the last four are final)."""
    model: str
    version: str
    task: str
    priority: str
    total: int
    """Items in the job (known once the submission has ended: `sealed`)."""
    sealed: bool
    done: int
    """Items answered with a result."""
    failed: int
    """Items answered with an error."""
    created: float
    started: float
    finished: float
    expires: float
    error: str
    idempotency_key: str
    trace_id: str = ""
    """The submission's distributed trace, which its items continue (when traces export)."""

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def answered(self) -> int:
        return self.done + self.failed


@dataclass(frozen=True)
class JobItem:
    """One item's answer: its result (as `Client.infer` gives it) or why it failed."""

    index: int
    result: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def _status(job: jobs_pb2.Job) -> JobStatus:
    return JobStatus(
        id=job.id,
        state=jobs_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_").lower(),
        model=job.model,
        version=job.version,
        task=TASK_NAMES.get(job.task, "unspecified"),
        priority=PRIORITY_NAMES.get(job.priority, "normal"),
        total=job.total,
        sealed=job.sealed,
        done=job.done,
        failed=job.failed,
        created=job.created_unix_ms / 1000,
        started=job.started_unix_ms / 1000,
        finished=job.finished_unix_ms / 1000,
        expires=job.expires_unix_ms / 1000,
        error=job.error,
        idempotency_key=job.idempotency_key,
        trace_id=job.trace_id,
    )


def _item(item: jobs_pb2.JobItemResult) -> JobItem:
    if item.HasField("result"):
        return JobItem(item.index, _result(item.result))
    return JobItem(item.index, error=item.error)


def _header(
    model: str,
    task: str | None,
    version: str,
    truncate: bool,
    top_k: int,
    idempotency_key: str,
    priority: str,
    retention_s: int,
    timeout_s: int,
) -> gateway_pb2.SubmitJobRequest:
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {sorted(TASKS)}")
    if priority not in PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}; use one of {sorted(PRIORITIES)}")
    header = gateway_pb2.JobHeader(
        model=model,
        version=version,
        task=TASKS[task] if task else common_pb2.TASK_UNSPECIFIED,
        options=gateway_pb2.InferOptions(truncate=truncate, top_k=top_k),
        idempotency_key=idempotency_key,
        priority=PRIORITIES[priority],
        retention_s=retention_s,
        timeout_s=timeout_s,
    )
    return gateway_pb2.SubmitJobRequest(header=header)


def _chunks(texts: str | Iterable[str]) -> Iterator[gateway_pb2.SubmitJobRequest]:
    """The texts in messages of `_CHUNK`, read lazily: a generator is never held whole."""
    iterator = iter([texts] if isinstance(texts, str) else texts)
    while chunk := list(itertools.islice(iterator, _CHUNK)):
        yield gateway_pb2.SubmitJobRequest(items=gateway_pb2.JobItems(texts=chunk))


async def _async_chunks(
    texts: str | Iterable[str] | AsyncIterable[str],
) -> AsyncIterator[gateway_pb2.SubmitJobRequest]:
    if not isinstance(texts, AsyncIterable):
        for request in _chunks(texts):
            yield request
        return
    chunk: list[str] = []
    async for text in texts:
        chunk.append(text)
        if len(chunk) >= _CHUNK:
            yield gateway_pb2.SubmitJobRequest(items=gateway_pb2.JobItems(texts=chunk))
            chunk = []
    if chunk:
        yield gateway_pb2.SubmitJobRequest(items=gateway_pb2.JobItems(texts=chunk))


class Job:
    """A handle on a batch job of a `Client`; every method asks the gateway afresh."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def status(self) -> JobStatus:
        return _status(self.client._call("GetJob", jobs_pb2.GetJobRequest(job_id=self.id)))

    def wait(self, progress: bool = False, timeout: float | None = None) -> JobStatus:
        """Block until the job has ended (state and progress streamed by the gateway);
        `progress=True` shows a progress bar with rate and ETA on the terminal."""
        from fmserve.progress import JobProgress

        request = jobs_pb2.GetJobRequest(job_id=self.id)
        status = None
        with JobProgress(enabled=progress) as bar:
            try:
                for job in self.client._stub.WatchJob(request, timeout=timeout):
                    status = _status(job)
                    bar.update(status)
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None
        return status or self.status()

    def results(self, page_size: int = _PAGE) -> Iterator[JobItem]:
        """Every answered item in item order, a page at a time; waits for the job first."""
        total = self.wait().total
        for start in range(0, total, page_size):
            request = jobs_pb2.GetJobResultsRequest(job_id=self.id, start=start, limit=page_size)
            yield from map(_item, self.client._call("GetJobResults", request).items)

    def cancel(self) -> JobStatus:
        """Stop the job's remaining items; FAILED_PRECONDITION (Conflict) once it has ended."""
        return _status(self.client._call("CancelJob", jobs_pb2.CancelJobRequest(job_id=self.id)))


class AsyncJob:
    """A handle on a batch job of an `AsyncClient`: `Job`'s twin, every call awaited."""

    def __init__(self, client: AsyncClient, job_id: str) -> None:
        self.client = client
        self.id = job_id

    async def status(self) -> JobStatus:
        request = jobs_pb2.GetJobRequest(job_id=self.id)
        return _status(await self.client._call("GetJob", request))

    async def wait(self, progress: bool = False, timeout: float | None = None) -> JobStatus:
        """Wait until the job has ended; `progress=True` shows a progress bar."""
        from fmserve.progress import JobProgress

        request = jobs_pb2.GetJobRequest(job_id=self.id)
        status = None
        with JobProgress(enabled=progress) as bar:
            try:
                async for job in self.client._stub.WatchJob(request, timeout=timeout):
                    status = _status(job)
                    bar.update(status)
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None
        return status or await self.status()

    async def results(self, page_size: int = _PAGE) -> AsyncIterator[JobItem]:
        """Every answered item in item order, a page at a time; waits for the job first."""
        total = (await self.wait()).total
        for start in range(0, total, page_size):
            request = jobs_pb2.GetJobResultsRequest(job_id=self.id, start=start, limit=page_size)
            for item in (await self.client._call("GetJobResults", request)).items:
                yield _item(item)

    async def cancel(self) -> JobStatus:
        request = jobs_pb2.CancelJobRequest(job_id=self.id)
        return _status(await self.client._call("CancelJob", request))


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

    def submit(
        self,
        texts: str | Iterable[str],
        model: str,
        *,
        task: str | None = None,
        version: str = "",
        truncate: bool = False,
        top_k: int = 0,
        idempotency_key: str = "",
        priority: str = "normal",
        retention_s: int = 0,
        timeout_s: int = 0,
    ) -> Job:
        """Submit a batch job; returns once it is durable (RabbitMQ confirmed every item).
        `texts` may be any iterable, read lazily; the same `idempotency_key` gives the same
        job; `priority` is "normal", "high" or "low"; `timeout_s` expires an unfinished job."""
        header = _header(
            model, task, version, truncate, top_k, idempotency_key, priority, retention_s, timeout_s
        )
        requests = itertools.chain([header], _chunks(texts))
        try:
            job = self._stub.SubmitJob(requests, timeout=None)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return Job(self, job.id)

    def job(self, job_id: str) -> Job:
        """A handle on a job submitted before (NOT_FOUND is raised on its first call)."""
        return Job(self, job_id)

    def jobs(self, limit: int = 50) -> list[JobStatus]:
        """Recent jobs, newest first."""
        reply = self._call("ListJobs", jobs_pb2.ListJobsRequest(limit=limit))
        return [_status(job) for job in reply.jobs]

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

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

    async def submit(
        self,
        texts: str | Iterable[str],
        model: str,
        *,
        task: str | None = None,
        version: str = "",
        truncate: bool = False,
        top_k: int = 0,
        idempotency_key: str = "",
        priority: str = "normal",
        retention_s: int = 0,
        timeout_s: int = 0,
    ) -> AsyncJob:
        """Submit a batch job; returns once it is durable (see `Client.submit`). `texts` may
        also be an async iterable."""
        header = _header(
            model, task, version, truncate, top_k, idempotency_key, priority, retention_s, timeout_s
        )

        async def requests() -> AsyncIterator[gateway_pb2.SubmitJobRequest]:
            yield header
            async for request in _async_chunks(texts):
                yield request

        try:
            job = await self._stub.SubmitJob(requests(), timeout=None)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return AsyncJob(self, job.id)

    async def job(self, job_id: str) -> AsyncJob:
        """A handle on a job submitted before (NOT_FOUND is raised on its first call)."""
        return AsyncJob(self, job_id)

    async def jobs(self, limit: int = 50) -> list[JobStatus]:
        """Recent jobs, newest first."""
        reply = await self._call("ListJobs", jobs_pb2.ListJobsRequest(limit=limit))
        return [_status(job) for job in reply.jobs]

    async def _call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self._stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
