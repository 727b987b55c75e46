"""Distributed tracing with OpenTelemetry: one trace from the client through the gateway to
every stage and back, over gRPC metadata and AMQP headers alike (W3C `traceparent`).

Off unless an OTLP endpoint is configured (`FMSERVE_OTLP_ENDPOINT`); the API then hands out
non-recording spans, so instrumented code costs next to nothing. A batch that serves many
requests is one span, the child of its first request's span and linked to the others."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

tracer = trace.get_tracer("fmserve")


def configure(service: str, endpoint: str) -> None:
    """Export this process's spans to an OTLP/gRPC collector at `endpoint` (host:port);
    an empty endpoint leaves tracing off. Call once, from a service's main."""
    if not endpoint:
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": f"fmserve-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint, insecure=True)))
    trace.set_tracer_provider(provider)


def shutdown() -> None:
    """Flush spans still buffered (the SDK provider has shutdown; the no-op one has not)."""
    getattr(trace.get_tracer_provider(), "shutdown", lambda: None)()


def inject() -> dict[str, str]:
    """The current trace context as headers (`traceparent`), to send with a call or message."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


@contextmanager
def server_span(name: str, headers: Mapping[str, str]) -> Iterator[Span]:
    """A span for work that a caller asked for, continuing the caller's trace."""
    parent = propagate.extract(dict(headers))
    with tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER) as span:
        yield span


@contextmanager
def batch_span(name: str, contexts: Iterable[otel_context.Context]) -> Iterator[Span]:
    """A span for one batch: child of its first item's trace, linked to the others'."""
    contexts = list(contexts)
    parent = contexts[0] if contexts else None
    links = [Link(s.get_span_context()) for s in map(trace.get_current_span, contexts[1:])]
    with tracer.start_as_current_span(name, context=parent, links=links) as span:
        yield span


def mark_failed(span: Span, error: BaseException) -> None:
    span.set_status(Status(StatusCode.ERROR, type(error).__name__))


def current_context() -> otel_context.Context:
    return otel_context.get_current()


def current_trace_id() -> str:
    """The current trace's id in hex, or "" when nothing is traced."""
    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""
