"""The gateway's wire ↔ domain conversions (`fmserve.v1.Gateway` messages ↔ the calls and
answers of gateway.py and jobs.py). Named for their direction, as in every service: `to_domain`
/ `to_wire` for Infer, `<message>_to_domain` / `<message>_to_wire` for the rest."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fmserve.core import tracing
from fmserve.core.repository import ModelConfig
from fmserve.core.tasks import TASK_FROM_WIRE, TASK_TO_WIRE, TaskName
from fmserve.errors import InvalidInput
from fmserve.v1 import common_pb2, gateway_pb2
from services.gateway import sampling_codec
from services.gateway.gateway import Answer, CachePolicy, InferCall
from services.gateway.generator import Delta, Event, GenerateCall
from services.gateway.jobs import MIXED, Items, Submission
from services.gateway.media import Media
from services.gateway.sampling import Prompt

_POLICIES = {
    common_pb2.CACHE_POLICY_USE: CachePolicy.USE,
    common_pb2.CACHE_POLICY_BYPASS: CachePolicy.BYPASS,
    common_pb2.CACHE_POLICY_REFRESH: CachePolicy.REFRESH,
}


def to_domain(request: gateway_pb2.InferRequest) -> InferCall:
    options = request.options
    return InferCall(
        model=request.model,
        version=request.version,
        task=TASK_FROM_WIRE.get(request.task),
        texts=list(request.texts),
        truncate=options.truncate,
        top_k=options.top_k,
        cache_policy=_POLICIES.get(options.cache_policy, CachePolicy.USE),
        routing_key=request.routing_key,
        media=[media_to_domain(m) for m in request.media],
        candidate_labels=list(options.candidate_labels),
    )


def media_to_domain(media: common_pb2.Media) -> Media:
    return Media(
        mime_type=media.mime_type,
        data=media.data,
        sample_rate=media.sample_rate,
        channels=media.channels,
        sample_format=media.sample_format,
    )


def to_wire(answer: Answer) -> gateway_pb2.InferResponse:
    route = answer.route
    return gateway_pb2.InferResponse(
        model=route.model,
        version=route.version,
        task=TASK_TO_WIRE[route.task],
        results=answer.results,
        cache_hit=answer.cache_hit,
        trace_id=tracing.current_trace_id(),
    )


def generate_to_domain(request: gateway_pb2.GenerateRequest) -> GenerateCall:
    return GenerateCall(
        model=request.model,
        version=request.version,
        prompt=Prompt(request.prompt, tuple((m.role, m.content) for m in request.messages)),
        sampling=sampling_codec.to_domain(request.parameters),
        cache_policy=_POLICIES.get(request.cache_policy, CachePolicy.USE),
        routing_key=request.routing_key,
    )


def event_to_wire(event: Event) -> gateway_pb2.GenerateResponse:
    if isinstance(event, Delta):
        delta = gateway_pb2.GenerationDelta(text=event.text, token_ids=event.token_ids)
        return gateway_pb2.GenerateResponse(delta=delta)
    result = gateway_pb2.GenerationResult(
        model=event.route.model,
        version=event.route.version,
        generation=event.generation,
        cached=event.cached,
        trace_id=tracing.current_trace_id(),
    )
    return gateway_pb2.GenerateResponse(result=result)


def submission_to_domain(request: gateway_pb2.SubmitJobRequest | None) -> Submission:
    """The first message of a SubmitJob stream, which must carry the header."""
    if request is None or not request.HasField("header"):
        raise InvalidInput("the first SubmitJob message must carry the header (model, ...)")
    h = request.header
    return Submission(
        model=h.model,
        version=h.version,
        task=TASK_FROM_WIRE.get(h.task),
        truncate=h.options.truncate,
        top_k=h.options.top_k,
        idempotency_key=h.idempotency_key,
        priority=h.priority,
        retention_s=h.retention_s,
        timeout_s=h.timeout_s,
        expected_items=h.expected_items,
        sampling=sampling_codec.to_domain(h.parameters) if h.HasField("parameters") else None,
    )


async def items_to_domain(
    requests: AsyncIterator[gateway_pb2.SubmitJobRequest],
) -> AsyncIterator[Items]:
    """The items of the messages after the header (texts, or media), one list per message, as
    they arrive."""
    async for request in requests:
        if request.HasField("header"):
            raise InvalidInput("only the first SubmitJob message may carry a header")
        items = request.items
        if items.texts and items.media:
            raise InvalidInput(MIXED)
        yield [media_to_domain(m) for m in items.media] if items.media else list(items.texts)


def model_to_wire(config: ModelConfig) -> gateway_pb2.ModelInfo:
    """A model as ListModels describes it: the default version first."""
    versions = sorted(config.versions, key=lambda v: v != config.default_version)
    return gateway_pb2.ModelInfo(
        name=config.name,
        task=TASK_TO_WIRE[config.task],
        versions=versions,
        max_length=config.max_length,
        labels=config.labels if config.task is not TaskName.EMBEDDING else (),
        dimensions=config.dimensions,
        description=config.description,
    )
