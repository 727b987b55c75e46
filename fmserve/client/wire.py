"""The client's conversions between its calls and the gateway's messages: requests to the wire,
replies to the dataclasses of `fmserve.client.types`."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import grpc
import numpy as np

from fmserve.client import media
from fmserve.client.types import (
    Answer,
    ApiKey,
    Entity,
    Generation,
    GenerationDelta,
    GenerationParams,
    Guard,
    JobItem,
    JobStatus,
    LabelScore,
    ModelInfo,
    NewApiKey,
    SpeechSegment,
    TrafficPolicy,
    Transcription,
    Usage,
    VersionInfo,
    VoiceActivity,
    WordTiming,
)
from fmserve.core.jobs import state_from_wire
from fmserve.core.tasks import TASK_TO_WIRE, TaskName
from fmserve.rpc.options import grpc_options
from fmserve.v1 import common_pb2, gateway_pb2, jobs_pb2, keys_pb2, policy_pb2

TASKS = {task.value: wire for task, wire in TASK_TO_WIRE.items()}
TASK_NAMES = {wire: name for name, wire in TASKS.items()}
# `submit(..., task="generate")` reads as the client's `generate()` does.
TASK_ALIASES = {"generate": TaskName.TEXT_GENERATION.value}
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
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
TEXTS_PER_MESSAGE = 500  # texts per SubmitJob message: small messages, few of them
# Encoded media bytes per SubmitJob message (one item at least): well under the gateway's
# request limit (FMSERVE_GATEWAY_MAX_REQUEST_BYTES, 16 MiB by default), so a message of items
# fits wherever one item does.
MEDIA_MESSAGE_BYTES = 1024 * 1024
RESULTS_PAGE = 1000  # items per results page


def credentials(tls: bool, root_certificates: bytes | None) -> grpc.ChannelCredentials | None:
    """TLS credentials for the gateway when asked for (`root_certificates` implies TLS; without
    them, the system's roots); None: plaintext."""
    if not tls and root_certificates is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


def infer_request(
    texts: str | Sequence[str],
    model: str,
    task: str | None,
    version: str,
    truncate: bool,
    top_k: int,
    cache: str,
    routing_key: str = "",
) -> gateway_pb2.InferRequest:
    if isinstance(texts, str):
        texts = [texts]
    if cache not in CACHE_POLICIES:
        raise ValueError(f"unknown cache policy {cache!r}; use one of {sorted(CACHE_POLICIES)}")
    options = gateway_pb2.InferOptions(
        truncate=truncate, top_k=top_k, cache_policy=CACHE_POLICIES[cache]
    )
    return gateway_pb2.InferRequest(
        model=model,
        version=version,
        task=task_to_wire(task),
        texts=list(texts),
        options=options,
        routing_key=routing_key,
    )


def media_request(
    items: media.Item | Sequence[media.Item],
    model: str,
    task: str | None,
    version: str,
    top_k: int,
    cache: str,
    labels: Sequence[str],
    sample_rate: int,
    routing_key: str,
) -> gateway_pb2.InferRequest:
    """`labels`: zero-shot candidate labels (image-embedding models); `sample_rate`: that of
    numpy waveforms."""
    request = infer_request([], model, task, version, False, top_k, cache, routing_key)
    request.media.extend(media.items_to_wire(items, sample_rate))
    request.options.candidate_labels.extend(labels)
    return request


def generation_params(params: GenerationParams | None, given: dict[str, Any]) -> GenerationParams:
    """`params` (or the defaults) with the keyword arguments given beside it; an unknown one
    is a TypeError that names it."""
    return replace(params or GenerationParams(), **given)


def sampling_parameters(params: GenerationParams) -> common_pb2.SamplingParameters:
    """`max_new_tokens=None` is left unset (the model's default); the gateway checks every
    value."""
    stop = params.stop
    return common_pb2.SamplingParameters(
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        seed=params.seed,
        repetition_penalty=params.repetition_penalty,
        stop=[stop] if isinstance(stop, str) else list(stop),
        stop_token_ids=list(params.stop_token_ids),
    )


def generate_request(
    prompt: str | None,
    messages: Sequence[dict[str, str]] | None,
    model: str,
    version: str = "",
    params: GenerationParams | None = None,
    cache: str = "use",
    routing_key: str = "",
) -> gateway_pb2.GenerateRequest:
    if cache not in CACHE_POLICIES:
        raise ValueError(f"unknown cache policy {cache!r}; use one of {sorted(CACHE_POLICIES)}")
    chat = [common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages or ()]
    return gateway_pb2.GenerateRequest(
        model=model,
        version=version,
        prompt=prompt or "",
        messages=chat,
        parameters=sampling_parameters(params or GenerationParams()),
        cache_policy=CACHE_POLICIES[cache],
        routing_key=routing_key,
    )


def to_generation_event(reply: gateway_pb2.GenerateResponse) -> GenerationDelta | Generation:
    if reply.HasField("delta"):
        return GenerationDelta(reply.delta.text, list(reply.delta.token_ids))
    result = reply.result
    return to_generation(
        result.generation,
        cached=result.cached,
        model=result.model,
        version=result.version,
        trace_id=result.trace_id,
    )


def to_generation(generation: common_pb2.Generation, **about: Any) -> Generation:
    """`about`: what the reply says besides the generation (cached, model, version, trace_id)."""
    usage = generation.usage
    return Generation(
        text=generation.text,
        finish_reason=generation.finish_reason,
        usage=Usage(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens),
        token_ids=list(generation.token_ids),
        **about,
    )


def to_result(result: common_pb2.Result) -> Any:
    kind = result.WhichOneof("value")
    if kind == "embedding":
        return np.asarray(result.embedding.values, dtype=np.float32)
    if kind == "classification":
        return [LabelScore(s.label, s.score) for s in result.classification.labels]
    if kind == "generation":  # a text-generation job's item
        return to_generation(result.generation, cached=result.cached)
    if kind == "transcription":
        words = result.transcription.words
        return Transcription(
            result.transcription.text, [WordTiming(w.word, w.start_s, w.end_s) for w in words]
        )
    if kind == "voice_activity":
        activity = result.voice_activity
        return VoiceActivity(
            np.asarray(activity.frame_probabilities, dtype=np.float32),
            activity.frame_s,
            [SpeechSegment(s.start_s, s.end_s) for s in activity.segments],
        )
    return [Entity(e.label, e.score, e.start, e.end, e.text) for e in result.entities.entities]


def to_answer(reply: gateway_pb2.InferResponse) -> Answer:
    return Answer(
        model=reply.model,
        version=reply.version,
        task=TASK_NAMES.get(reply.task, "unspecified"),
        results=[to_result(r) for r in reply.results],
        cached=[r.cached for r in reply.results],
        trace_id=reply.trace_id,
    )


def to_model_info(info: gateway_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        info.name,
        TASK_NAMES.get(info.task, "unspecified"),
        list(info.versions),
        info.max_length,
        list(info.labels),
        info.dimensions,
        info.description,
    )


def to_api_key(info: keys_pb2.ApiKeyInfo) -> ApiKey:
    return ApiKey(
        key_id=info.key_id,
        name=info.name,
        scopes=list(info.scopes),
        created=info.created_unix_ms / 1000,
        expires=info.expires_unix_ms / 1000,
        revoked=info.revoked,
        rpm=info.rpm,
        max_concurrency=info.max_concurrency,
        daily_items=info.daily_items,
    )


def to_new_api_key(reply: keys_pb2.CreateApiKeyResponse) -> NewApiKey:
    return NewApiKey(to_api_key(reply.info), reply.api_key)


def create_key_request(
    name: str,
    scopes: Sequence[str],
    rpm: int,
    max_concurrency: int,
    daily_items: int,
    expires_in_s: int,
) -> keys_pb2.CreateApiKeyRequest:
    return keys_pb2.CreateApiKeyRequest(
        name=name,
        scopes=list(scopes),
        rpm=rpm,
        max_concurrency=max_concurrency,
        daily_items=daily_items,
        expires_in_s=expires_in_s,
    )


def auth_metadata(api_key: str) -> tuple[tuple[str, str], ...]:
    """The metadata that carries an API key (none without a key)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def channel_options() -> list[tuple[str, Any]]:
    return grpc_options(MAX_MESSAGE_BYTES)


def to_job_status(job: jobs_pb2.Job) -> JobStatus:
    return JobStatus(
        id=job.id,
        state=state_name(job.state),
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


def state_name(wire: int) -> str:
    """A job state as users read it: "succeeded" (the enum's value in lower case)."""
    try:
        return state_from_wire(wire).lower()
    except ValueError:  # JOB_STATE_UNSPECIFIED, or a newer gateway's state
        return "unspecified"


def to_job_item(item: jobs_pb2.JobItemResult) -> JobItem:
    if item.HasField("result"):
        return JobItem(item.index, to_result(item.result))
    return JobItem(item.index, error=item.error)


def task_to_wire(task: str | None) -> common_pb2.Task:
    """A task as users name it ("embedding", "text-generation" or "generate"); None: the
    model's own."""
    if task is None:
        return common_pb2.TASK_UNSPECIFIED
    task = TASK_ALIASES.get(task, task)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {sorted([*TASKS, *TASK_ALIASES])}")
    return TASKS[task]


def job_header(
    model: str,
    task: str | None,
    version: str,
    truncate: bool,
    top_k: int,
    idempotency_key: str,
    priority: str,
    retention_s: int,
    timeout_s: int,
    params: GenerationParams | None = None,
) -> gateway_pb2.SubmitJobRequest:
    """`params`: a text-generation job's (see `job_params`)."""
    if priority not in PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}; use one of {sorted(PRIORITIES)}")
    header = gateway_pb2.JobHeader(
        model=model,
        version=version,
        task=task_to_wire(task),
        options=gateway_pb2.InferOptions(truncate=truncate, top_k=0 if params else top_k),
        idempotency_key=idempotency_key,
        priority=PRIORITIES[priority],
        retention_s=retention_s,
        timeout_s=timeout_s,
    )
    if params is not None:
        header.parameters.CopyFrom(sampling_parameters(params))
    return gateway_pb2.SubmitJobRequest(header=header)


def generates(task: str | None) -> bool:
    """Whether a job of this task generates text (its texts are prompts)."""
    return task_to_wire(task) == common_pb2.TASK_TEXT_GENERATION


def job_params(
    task: str | None, top_k: int, params: GenerationParams | None, given: dict[str, Any]
) -> GenerationParams | None:
    """A text-generation job's parameters; None for other tasks, which take none. `submit`'s
    `top_k` is the sampling's top_k in a text-generation job (the labels' in a classification
    one)."""
    if not generates(task):
        if params is not None or given:
            raise ValueError(f"sampling parameters apply to text-generation jobs, not {task!r}")
        return None
    return generation_params(params, {"top_k": top_k, **given} if top_k else given)


def declared_size(texts: object) -> int:
    """How many texts a submission holds, when that is known without reading them (a string
    is one text, a sequence has a length); 0 for an iterator or generator."""
    if isinstance(texts, str):
        return 1
    return len(texts) if isinstance(texts, Sequence) else 0


def text_chunks(texts: str | Iterable[str]) -> Iterator[gateway_pb2.SubmitJobRequest]:
    """The texts in messages of TEXTS_PER_MESSAGE, read lazily: never held whole."""
    iterator = iter([texts] if isinstance(texts, str) else texts)
    while chunk := list(itertools.islice(iterator, TEXTS_PER_MESSAGE)):
        yield gateway_pb2.SubmitJobRequest(items=gateway_pb2.JobItems(texts=chunk))


def declared_media(items: object) -> int:
    """How many media items a submission holds, when known without reading them (as
    `declared_size`: one item, or a sequence's length; 0 for an iterator)."""
    return 1 if media.is_one(items) else declared_size(items)


def media_chunks(
    items: media.Item | Iterable[media.Item], sample_rate: int
) -> Iterator[gateway_pb2.SubmitJobRequest]:
    """The items encoded in messages of up to MEDIA_MESSAGE_BYTES, read lazily: a job's files
    are never all in memory at once."""
    batch: list[common_pb2.Media] = []
    size = 0
    for item in media.each(items):
        one = media.to_wire(item, sample_rate)
        if batch and size + len(one.data) > MEDIA_MESSAGE_BYTES:
            yield gateway_pb2.SubmitJobRequest(items=gateway_pb2.JobItems(media=batch))
            batch, size = [], 0
        batch.append(one)
        size += len(one.data)
    if batch:
        yield gateway_pb2.SubmitJobRequest(items=gateway_pb2.JobItems(media=batch))


async def async_text_chunks(
    texts: str | Iterable[str] | AsyncIterable[str],
) -> AsyncIterator[gateway_pb2.SubmitJobRequest]:
    if not isinstance(texts, AsyncIterable):
        for request in text_chunks(texts):
            yield request
        return
    chunk: list[str] = []
    async for text in texts:
        chunk.append(text)
        if len(chunk) >= TEXTS_PER_MESSAGE:
            yield gateway_pb2.SubmitJobRequest(items=gateway_pb2.JobItems(texts=chunk))
            chunk = []
    if chunk:
        yield gateway_pb2.SubmitJobRequest(items=gateway_pb2.JobItems(texts=chunk))


def policy_request(policy: TrafficPolicy) -> policy_pb2.SetTrafficPolicyRequest:
    g = policy.guard
    return policy_pb2.SetTrafficPolicyRequest(
        policy=policy_pb2.TrafficPolicy(
            model=policy.model,
            stable_version=policy.stable,
            canary_version=policy.canary,
            canary_percent=policy.canary_percent,
            sticky=policy.sticky,
            shadow_version=policy.shadow,
            guard=policy_pb2.Guard(
                max_error_ratio=g.max_error_ratio,
                max_p99_ms=g.max_p99_ms,
                window_s=g.window_s,
                min_requests=g.min_requests,
            ),
        )
    )


def to_traffic_policy(policy: policy_pb2.TrafficPolicy) -> TrafficPolicy:
    g = policy.guard
    state = policy_pb2.RolloutState.Name(policy.status.state).removeprefix("ROLLOUT_STATE_")
    return TrafficPolicy(
        model=policy.model,
        stable=policy.stable_version,
        canary=policy.canary_version,
        canary_percent=policy.canary_percent,
        sticky=policy.sticky,
        shadow=policy.shadow_version,
        guard=Guard(g.max_error_ratio, g.max_p99_ms, g.window_s, g.min_requests),
        previous=policy.previous_version,
        state="" if state == "UNSPECIFIED" else state.lower(),
        state_version=policy.status.version,
        reason=policy.status.reason,
        revision=policy.revision,
    )


def to_version_info(row: policy_pb2.ModelVersion) -> VersionInfo:
    return VersionInfo(
        model=row.model,
        version=row.version,
        state=row.state,
        reason=row.reason,
        memory_bytes=row.memory_bytes,
        traffic_percent=row.traffic_percent,
        shadow=row.shadow,
        requests=row.requests,
        errors=row.errors,
        window_s=row.window_s,
    )
