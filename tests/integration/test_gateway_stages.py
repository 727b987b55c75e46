"""The gateway's stage clients (services/gateway/stages.py) against fake stage servers on free
ports: what each call puts on the wire, the deadline and request id it carries, and how each
stage's failure arrives as an fmserve error (the one boundary that sees gRPC and tritonclient
errors)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from fmserve.core import context, tensors
from fmserve.core.tasks import TaskName
from fmserve.errors import (
    DeadlineExceeded,
    FmserveError,
    InputTooLong,
    InvalidInput,
    ModelNotFound,
    NotFound,
    Overloaded,
    Unavailable,
)
from fmserve.v1 import common_pb2, preprocess_pb2
from services.gateway.routes import Route
from services.gateway.stages import StageClients
from tests.integration.stage_fakes import Fakes, closed_port_address, expected, fake_stages

pytestmark = pytest.mark.timeout(20)

EMBED = Route("embedder", "3", TaskName.EMBEDDING)
CLASSIFY = Route("sentiment", "1", TaskName.TEXT_CLASSIFICATION, top_k=2)
TAG = Route("ner", "2", TaskName.TOKEN_CLASSIFICATION)
TEXTS = ["a bb ccc", "dddd"]


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    async with fake_stages() as fakes:
        yield fakes


@pytest.fixture
async def stages(fakes: Fakes) -> AsyncIterator[StageClients]:
    clients = StageClients(fakes.settings())
    await clients.start()
    yield clients
    await clients.stop()


async def through(stages: StageClients, route: Route, texts: list[str]) -> list[common_pb2.Result]:
    tokens = await stages.tokenize(route, texts, 5.0)
    output = await stages.infer(route, tokens, 5.0, priority=0)
    return await stages.postprocess(route, texts, tokens, output, 5.0)


# --- what goes on the wire -------------------------------------------------------------------


async def test_texts_go_through_the_three_stages_and_come_back_in_order(
    fakes: Fakes, stages: StageClients
) -> None:
    results = await through(stages, EMBED, TEXTS)
    assert [list(r.embedding.values) for r in results] == [expected(t) for t in TEXTS]
    (tokenize,) = fakes.preprocess.calls
    assert (tokenize.request.model, tokenize.request.version) == ("embedder", "3")
    assert not tokenize.request.return_offsets


async def test_inference_is_asked_for_the_tasks_output_by_model_and_version(
    fakes: Fakes, stages: StageClients
) -> None:
    await through(stages, EMBED, TEXTS)
    await through(stages, CLASSIFY, TEXTS)
    embed, classify = (call.request for call in fakes.inference.calls)
    assert (embed.model_name, embed.model_version) == ("embedder", "3")
    assert [o.name for o in embed.outputs] == ["embeddings"]
    assert [o.name for o in classify.outputs] == ["logits"]
    assert {i.name: list(i.shape) for i in embed.inputs} == {"input_ids": [4], "lengths": [2]}


async def test_background_priority_reaches_the_inference_request(
    fakes: Fakes, stages: StageClients
) -> None:
    tokens = await stages.tokenize(EMBED, TEXTS, 5.0)
    await stages.infer(EMBED, tokens, 5.0, priority=1)
    await stages.infer(EMBED, tokens, 5.0, priority=0)
    background, interactive = (call.request for call in fakes.inference.calls)
    assert background.parameters["priority"].uint64_param == 1
    assert "priority" not in interactive.parameters  # 0, the default, is not sent


async def test_classification_carries_task_and_top_k_to_postprocess(
    fakes: Fakes, stages: StageClients
) -> None:
    results = await through(stages, CLASSIFY, TEXTS)
    (call,) = fakes.postprocess.calls
    assert (call.request.task, call.request.top_k) == (common_pb2.TASK_TEXT_CLASSIFICATION, 2)
    assert not call.request.texts  # only token classification needs the texts back
    assert [r.classification.labels[0].label for r in results] == ["sum=6", "sum=4"]


async def test_per_text_top_k_asks_postprocess_for_the_most_and_cuts_each_text(
    fakes: Fakes, stages: StageClients
) -> None:
    texts = ["a", "bb", "ccc"]
    tokens = await stages.tokenize(CLASSIFY, texts, 5.0)
    output = await stages.infer(CLASSIFY, tokens, 5.0, priority=0)
    results = await stages.postprocess(CLASSIFY, texts, tokens, output, 5.0, top_k=[1, 4, 2])
    assert fakes.postprocess.calls[-1].request.top_k == 4
    assert [[s.label for s in r.classification.labels] for r in results] == [
        ["sum=1"],
        ["sum=2", "label1", "label2", "label3"],
        ["sum=3", "label1"],
    ]
    await stages.postprocess(CLASSIFY, texts, tokens, output, 5.0, top_k=[1, 0, 2])
    assert fakes.postprocess.calls[-1].request.top_k == 0  # 0: every label, for one text


async def test_token_classification_sends_offsets_and_texts_to_postprocess(
    fakes: Fakes, stages: StageClients
) -> None:
    await through(stages, TAG, TEXTS)
    (tokenize,) = fakes.preprocess.calls
    assert tokenize.request.return_offsets
    (call,) = fakes.postprocess.calls
    assert list(call.request.texts) == TEXTS
    assert tensors.to_domain(call.request.lengths).tolist() == [3, 1]
    assert tensors.to_domain(call.request.offsets).shape == (4, 2)


async def test_the_cache_stores_with_the_settings_ttl_and_finds_by_key(fakes: Fakes) -> None:
    stages = StageClients(fakes.settings(cache_ttl_s=90))
    await stages.start()
    try:
        result = common_pb2.Result(embedding=common_pb2.Embedding(values=[1.0]))
        await stages.store([("k1", result)], timeout=5.0)
        found = await stages.lookup(["k0", "k1"], timeout=5.0)
    finally:
        await stages.stop()
    assert fakes.cache.calls[0].request.ttl_s == 90
    assert found[0] is None
    assert found[1] is not None and list(found[1].embedding.values) == [1.0]


# --- deadline and request id -----------------------------------------------------------------


async def test_every_stage_gets_the_time_it_was_given(fakes: Fakes, stages: StageClients) -> None:
    tokens = await stages.tokenize(EMBED, TEXTS, 3.0)
    output = await stages.infer(EMBED, tokens, 2.0, priority=0)
    await stages.postprocess(EMBED, TEXTS, tokens, output, 1.0)
    await stages.lookup(["k"], timeout=0.5)
    seen = [
        fakes.preprocess.calls[0].time_left_s,
        fakes.inference.calls[0].time_left_s,
        fakes.postprocess.calls[0].time_left_s,
        fakes.cache.calls[0].time_left_s,
    ]
    for given, left in zip([3.0, 2.0, 1.0, 0.5], seen, strict=True):
        assert left is not None and given - 0.5 < left <= given + 0.1  # gRPC rounds up a little


async def test_the_request_id_travels_to_every_stage(fakes: Fakes, stages: StageClients) -> None:
    token = context.request_id.set("req-stages-1")
    try:
        await through(stages, EMBED, TEXTS)
        await stages.lookup(["k"], timeout=1.0)
    finally:
        context.request_id.reset(token)
    stage_calls = [fakes.preprocess, fakes.inference, fakes.postprocess, fakes.cache]
    assert [stage.calls[0].request_id for stage in stage_calls] == ["req-stages-1"] * 4


# --- errors ----------------------------------------------------------------------------------


async def test_a_text_preprocess_refuses_is_the_clients_error_with_its_class(
    stages: StageClients,
) -> None:
    with pytest.raises(InputTooLong, match=r"texts\[1\] is over embedder's maximum length"):
        await stages.tokenize(EMBED, ["fine", "please refuse this"], 5.0)


@pytest.mark.parametrize(
    ("stage", "raised", "arrives_as", "message"),
    [
        (
            "preprocess",
            ModelNotFound("model 'x' is unknown"),
            ModelNotFound,
            "model 'x' is unknown",
        ),
        ("preprocess", Unavailable("loading"), Unavailable, "the preprocess stage is unavailable"),
        ("inference", Unavailable("not ready"), Unavailable, "the inference stage is unavailable"),
        # tritonclient keeps the code but not the trailing metadata: the kind, not the class.
        ("inference", ModelNotFound("no model 'x'"), NotFound, "no model 'x'"),
        ("inference", Overloaded("queue full"), Overloaded, "queue full"),
        ("postprocess", Overloaded("busy"), Overloaded, "busy"),
    ],
    ids=[
        "preprocess-model-not-found",
        "preprocess-unavailable",
        "inference-unavailable",
        "inference-model-not-found",
        "inference-overloaded",
        "postprocess-overloaded",
    ],
)
async def test_a_stages_error_arrives_as_an_fmserve_error(
    fakes: Fakes,
    stages: StageClients,
    stage: str,
    raised: FmserveError,
    arrives_as: type[FmserveError],
    message: str,
) -> None:
    getattr(fakes, stage).error = raised
    with pytest.raises(arrives_as, match=message) as caught:
        await through(stages, EMBED, TEXTS)
    assert caught.value.code == raised.code


@pytest.mark.parametrize("stage", ["inference", "postprocess"])
async def test_invalid_argument_after_preprocess_is_the_gateways_fault(
    fakes: Fakes, stages: StageClients, stage: str
) -> None:
    """Only preprocess judges what a client sent: a later stage refusing is a server fault, and
    its details (which may name internals) are logged, not passed on."""
    getattr(fakes, stage).error = InvalidInput("input_ids: shape [4] needs 32 bytes, got 8")
    with pytest.raises(FmserveError) as caught:
        await through(stages, EMBED, TEXTS)
    assert type(caught.value) is FmserveError
    assert caught.value.code is grpc.StatusCode.INTERNAL
    assert caught.value.message == f"the {stage} stage refused the gateway's request"


async def test_unavailable_is_retried_before_it_is_reported(
    fakes: Fakes, stages: StageClients
) -> None:
    fakes.preprocess.error = Unavailable("warming up")
    with pytest.raises(Unavailable):
        await stages.tokenize(EMBED, TEXTS, 5.0)
    # one call on the tunnel, then as a unary call: the channels' retry policy's four attempts
    assert len(fakes.preprocess.calls) == 5


async def test_a_stage_slower_than_its_timeout_is_deadline_exceeded(
    fakes: Fakes, stages: StageClients
) -> None:
    fakes.inference.delay_s = 2.0
    tokens = preprocess_pb2.TokenizeResponse(
        input_ids=tensors.to_wire(np.array([1], dtype=np.int64)),
        lengths=tensors.to_wire(np.array([1], dtype=np.int32)),
    )
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="waiting for the inference stage"):
        await stages.infer(EMBED, tokens, 0.2, priority=0)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("stage", ["preprocess", "inference", "postprocess"])
async def test_a_stage_with_no_server_is_unavailable(fakes: Fakes, stage: str) -> None:
    stages = StageClients(fakes.settings(**{f"{stage}_address": closed_port_address()}))
    await stages.start()
    try:
        with pytest.raises(Unavailable, match=f"the {stage} stage is unavailable"):
            await through(stages, EMBED, TEXTS)
    finally:
        await stages.stop()
