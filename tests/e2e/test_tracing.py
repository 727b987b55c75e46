"""One trace per request: a span for every hop, linked as parent and child, on the sync path
(gRPC) and for a job's items (AMQP)."""

from __future__ import annotations

import uuid

import pytest

from fmserve import Client
from tests.otlp_collector import Collector, ReceivedSpan

pytestmark = pytest.mark.e2e

SYNC_HOPS = {
    "fmserve-gateway": "gateway/Infer",
    "fmserve-preprocess": "preprocess/Tokenize",
    "fmserve-inference": "inference/ModelInfer",
    "fmserve-postprocess": "postprocess/Postprocess",
}


def _chain_to_root(spans: list[ReceivedSpan], span: ReceivedSpan) -> list[str]:
    """Span names from `span` up through its parents to the trace's root."""
    by_id = {s.span_id: s for s in spans}
    names = [span.name]
    while span.parent_id and span.parent_id in by_id:
        span = by_id[span.parent_id]
        names.append(span.name)
    return names


def test_a_sync_request_is_one_trace_through_every_stage(
    gateway_address: str, collector: Collector
) -> None:
    with Client(gateway_address) as client:
        answer = client.infer([f"traced {uuid.uuid4().hex}"], "minilm-embed", cache="bypass")
    assert len(answer.trace_id) == 32
    spans = collector.wait_for(answer.trace_id, set(SYNC_HOPS))
    names = {s.name for s in spans}
    assert set(SYNC_HOPS.values()) <= names, names
    root = next(s for s in spans if s.name == "gateway/Infer")
    for name in ("preprocess/Tokenize", "inference/ModelInfer", "postprocess/Postprocess"):
        stage = next(s for s in spans if s.name == name)
        chain = _chain_to_root(spans, stage)
        assert chain[-1] == root.name and "gateway/batch" in chain, chain


def test_a_job_item_is_traced_through_the_queues(
    gateway_address: str, collector: Collector
) -> None:
    with Client(gateway_address) as client:
        job = client.submit([f"queued {uuid.uuid4().hex}" for _ in range(3)], model="minilm-embed")
        job.wait(timeout=60)
        status = job.status()
    assert len(status.trace_id) == 32
    services = {"fmserve-gateway", "fmserve-preprocess", "fmserve-inference", "fmserve-postprocess"}
    spans = collector.wait_for(status.trace_id, services)
    consumed = {s.name for s in spans if s.name.endswith("/consume")}
    assert {"preprocess/consume", "inference/consume", "postprocess/consume"} <= consumed
    postprocess = next(s for s in spans if s.name == "postprocess/consume")
    chain = _chain_to_root(spans, postprocess)
    assert chain[-1] == "gateway/SubmitJob"
    assert chain.index("inference/consume") < chain.index("preprocess/consume"), chain
