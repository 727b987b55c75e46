"""The gateway's synchronous path (services/gateway/pipeline.py) against fake stage servers on
free ports: texts go through preprocess → inference → postprocess in batches, concurrent
requests share a batch, identical texts in flight are computed once, one bad text fails alone,
and every batch carries its deadline and its first request's id downstream."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest

from fmserve.core import context
from fmserve.core.tasks import TaskName
from fmserve.errors import DeadlineExceeded, InputTooLong, Unavailable
from fmserve.v1 import common_pb2
from services.gateway.pipeline import Pipeline
from services.gateway.routes import Route
from services.gateway.stages import StageClients
from tests.conftest import AsyncioReports
from tests.integration.stage_fakes import CLASSIFIER_LABELS, Fakes, Stage, expected, fake_stages

pytestmark = pytest.mark.timeout(20)

ROUTE = Route("embedder", "1", TaskName.EMBEDDING)
CLASSIFY = Route("sentiment", "1", TaskName.TEXT_CLASSIFICATION)


@dataclass
class Gateway:
    """The fakes, and the gateway's pipeline over its stage clients."""

    fakes: Fakes
    pipeline: Pipeline

    async def run(self, texts: list[str], timeout_s: float = 5.0) -> list[list[float]]:
        results = await self.pipeline.run(ROUTE, texts, time.monotonic() + timeout_s)
        return [vector(r) for r in results]


def vector(result: common_pb2.Result) -> list[float]:
    return list(result.embedding.values)


def labels(result: common_pb2.Result) -> list[str]:
    return [label.label for label in result.classification.labels]


@pytest.fixture
async def make_gateway() -> AsyncIterator[Callable[..., Any]]:
    """Builds the pipeline with settings overrides; everything is stopped after the test."""
    async with fake_stages() as fakes:
        built: list[tuple[StageClients, Pipeline]] = []

        async def make(**overrides: Any) -> Gateway:
            settings = fakes.settings(**overrides)
            stages = StageClients(settings)
            await stages.start()
            pipeline = Pipeline(stages, settings)
            built.append((stages, pipeline))
            return Gateway(fakes, pipeline)

        yield make
        for stages, pipeline in built:
            await pipeline.stop()
            await stages.stop()


@pytest.fixture
async def gateway(make_gateway: Callable[..., Any]) -> Gateway:
    return await make_gateway()


def batches(stage: Stage) -> list[list[str]]:
    """The texts of each Tokenize call a fake preprocess answered."""
    return [list(call.request.texts) for call in stage.calls]


async def until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def hold_preprocess(
    gateway: Gateway, route: Route = ROUTE
) -> tuple[asyncio.Event, asyncio.Task[Any]]:
    """A first request that holds the only batch slot (max_batches_in_flight=1) of its route's
    batcher at preprocess, so what arrives next queues; set the event to let it go."""
    gate = asyncio.Event()
    gateway.fakes.preprocess.gate = gate
    deadline = time.monotonic() + 5.0
    first = asyncio.create_task(gateway.pipeline.run(route, ["first one"], deadline))
    await until(lambda: len(gateway.fakes.preprocess.calls) == 1)
    return gate, first


# --- results ---------------------------------------------------------------------------------


async def test_a_requests_texts_come_back_in_order(gateway: Gateway) -> None:
    texts = ["a", "bb cc", "ddd eee fff", "gggg"]
    assert await gateway.run(texts) == [expected(t) for t in texts]


async def test_a_requests_texts_travel_together_in_one_call_per_stage(gateway: Gateway) -> None:
    """Hop costs are paid per batch: an idle gateway sends a request's texts as one batch."""
    texts = [f"text number {i}" for i in range(10)]
    assert await gateway.run(texts) == [expected(t) for t in texts]
    fakes = gateway.fakes
    assert batches(fakes.preprocess) == [texts]
    assert (len(fakes.inference.calls), len(fakes.postprocess.calls)) == (1, 1)


async def test_a_request_over_the_batch_size_is_split_into_full_batches(
    make_gateway: Callable[..., Any],
) -> None:
    gateway = await make_gateway(max_batch_size=4)
    texts = [f"t{i}" * (i + 1) for i in range(10)]
    assert await gateway.run(texts) == [expected(t) for t in texts]
    assert sorted(len(b) for b in batches(gateway.fakes.preprocess)) == [2, 4, 4]


# --- batching --------------------------------------------------------------------------------


async def test_concurrent_requests_share_a_batch(make_gateway: Callable[..., Any]) -> None:
    gateway = await make_gateway(max_batches_in_flight=1)
    gate, first = await hold_preprocess(gateway)
    texts = [f"request {'x' * i}" for i in range(5)]
    others = [asyncio.create_task(gateway.run([text])) for text in texts]
    await asyncio.sleep(0.05)  # they queue behind the held batch
    gate.set()
    assert await asyncio.gather(*others) == [[expected(t)] for t in texts]
    await first
    assert batches(gateway.fakes.preprocess) == [["first one"], texts]
    assert len(gateway.fakes.inference.calls) == len(gateway.fakes.postprocess.calls) == 2


async def test_identical_texts_in_flight_are_computed_once(
    make_gateway: Callable[..., Any],
) -> None:
    gateway = await make_gateway(max_batches_in_flight=1)
    gate, first = await hold_preprocess(gateway)
    same = [asyncio.create_task(gateway.run(["same text", "other"])) for _ in range(3)]
    await asyncio.sleep(0.05)
    gate.set()
    answers = await asyncio.gather(*same)
    await first
    assert answers == [[expected("same text"), expected("other")]] * 3
    assert batches(gateway.fakes.preprocess) == [["first one"], ["same text", "other"]]


async def test_a_text_repeated_in_one_request_is_computed_once(gateway: Gateway) -> None:
    assert await gateway.run(["a b", "c", "a b"]) == [expected("a b"), [1.0, 1.0], expected("a b")]
    assert sorted(t for b in batches(gateway.fakes.preprocess) for t in b) == ["a b", "c"]


async def test_one_bad_text_fails_alone_and_its_batch_mates_are_answered(
    make_gateway: Callable[..., Any],
) -> None:
    gateway = await make_gateway(max_batches_in_flight=1)
    gate, first = await hold_preprocess(gateway)
    texts = ["good one", "please refuse me", "good two"]
    waiting = [asyncio.create_task(gateway.run([text])) for text in texts]
    await asyncio.sleep(0.05)
    gate.set()
    good_one, bad, good_two = await asyncio.gather(*waiting, return_exceptions=True)
    await first
    assert (good_one, good_two) == ([expected("good one")], [expected("good two")])
    assert isinstance(bad, InputTooLong)
    # The batch of three failed at preprocess; then each text went alone (at once: they
    # arrive in any order).
    batch, *singles = batches(gateway.fakes.preprocess)[1:]
    assert batch == texts
    assert sorted(singles) == sorted([t] for t in texts)


async def test_a_request_with_a_bad_text_fails_with_that_texts_error(gateway: Gateway) -> None:
    with pytest.raises(InputTooLong, match="maximum length"):
        await gateway.run(["fine", "refuse"])


async def test_a_caller_that_gives_up_has_its_text_dropped_before_compute(
    make_gateway: Callable[..., Any],
) -> None:
    gateway = await make_gateway(max_batches_in_flight=1)
    gate, first = await hold_preprocess(gateway)
    gone = asyncio.create_task(gateway.run(["nobody waits for this"]))
    kept = asyncio.create_task(gateway.run(["still wanted"]))
    await asyncio.sleep(0.05)
    gone.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await gone
    gate.set()
    assert await kept == [expected("still wanted")]
    await first
    assert batches(gateway.fakes.preprocess) == [["first one"], ["still wanted"]]


async def test_a_caller_that_gives_up_leaves_no_exception_unretrieved(
    make_gateway: Callable[..., Any], asyncio_reports: AsyncioReports
) -> None:
    """A caller cancelled while its texts wait (its client went away, gRPC cancelled the call
    at its deadline): nothing it waited on is left holding an exception for asyncio to log."""
    gateway = await make_gateway(max_batches_in_flight=1)
    gate, first = await hold_preprocess(gateway)
    gone = asyncio.create_task(gateway.run(["nobody waits for this", "nor this"]))
    await asyncio.sleep(0.05)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    del gone  # its traceback's frames hold what it waited on, which asyncio reports when freed
    gate.set()
    await first
    assert await asyncio_reports.messages() == []


# --- per-request options --------------------------------------------------------------------


async def test_distinct_top_k_values_share_one_batcher_and_each_answer_keeps_its_own(
    gateway: Gateway,
) -> None:
    """top_k only cuts each text's labels: a client choosing a new value every call must not
    make a batcher (and a queue) per value that is never freed."""
    deadline = time.monotonic() + 10.0
    top_ks = range(1, 1001)
    answers = await asyncio.gather(
        *(gateway.pipeline.run(replace(CLASSIFY, top_k=k), [f"a {k}"], deadline) for k in top_ks)
    )
    assert gateway.pipeline.batchers == 1
    for k, (result,) in zip(top_ks, answers, strict=True):
        assert labels(result)[:2] == [f"sum={1 + len(str(k))}", "label1"][:k]
        assert len(labels(result)) == k


async def test_a_batch_mixing_top_k_values_is_one_call_per_stage_and_cut_per_request(
    make_gateway: Callable[..., Any],
) -> None:
    gateway = await make_gateway(max_batches_in_flight=1)
    gate, first = await hold_preprocess(gateway, replace(CLASSIFY, top_k=7))
    deadline = time.monotonic() + 5.0
    asks = [(3, "same text"), (0, "same text"), (1, "other"), (2, "same text")]
    waiting = [
        asyncio.create_task(gateway.pipeline.run(replace(CLASSIFY, top_k=k), [text], deadline))
        for k, text in asks
    ]
    await asyncio.sleep(0.05)
    gate.set()
    answers = [result for (result,) in await asyncio.gather(*waiting)]
    await first
    assert [len(labels(r)) for r in answers] == [3, CLASSIFIER_LABELS, 1, 2]
    assert [labels(r)[0] for r in answers] == ["sum=8", "sum=8", "sum=5", "sum=8"]
    fakes = gateway.fakes
    assert batches(fakes.preprocess)[1] == [text for _, text in asks]
    assert len(fakes.inference.calls) == len(fakes.postprocess.calls) == 2
    assert fakes.postprocess.calls[1].request.top_k == 0  # one asked for every label


# --- deadline and request id -----------------------------------------------------------------


async def test_what_is_left_of_the_deadline_goes_to_every_stage(gateway: Gateway) -> None:
    gateway.fakes.preprocess.delay_s = 0.3
    await gateway.run(["a b"], timeout_s=3.0)
    left = [
        stage.calls[0].time_left_s
        for stage in (gateway.fakes.preprocess, gateway.fakes.inference, gateway.fakes.postprocess)
    ]
    assert all(t is not None for t in left)
    pre, infer, post = (t or 0.0 for t in left)
    assert 2.5 < pre <= 3.1
    # Time spent upstream is not given again (gRPC rounds each timeout up by a few ms).
    assert infer < pre - 0.25 and post < infer + 0.02


async def test_a_slow_stage_past_the_deadline_is_deadline_exceeded(gateway: Gateway) -> None:
    gateway.fakes.inference.delay_s = 2.0
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await gateway.run(["a b"], timeout_s=0.3)
    assert time.monotonic() - started < 1.0


async def test_a_batch_carries_its_first_requests_id_downstream(
    make_gateway: Callable[..., Any],
) -> None:
    gateway = await make_gateway(max_batches_in_flight=1)
    gate, first = await hold_preprocess(gateway)

    async def run_as(request_id: str, text: str) -> list[list[float]]:
        context.request_id.set(request_id)  # this task's own context
        return await gateway.run([text])

    waiting = [asyncio.create_task(run_as(f"req-{i}", f"text {i}")) for i in range(3)]
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.gather(*waiting)
    await first
    fakes = gateway.fakes
    for stage in (fakes.preprocess, fakes.inference, fakes.postprocess):
        assert stage.calls[-1].request_id == "req-0"


async def test_a_stage_that_is_down_fails_the_request_with_unavailable(gateway: Gateway) -> None:
    gateway.fakes.postprocess.error = Unavailable("restarting")
    with pytest.raises(Unavailable, match="postprocess stage is unavailable"):
        await gateway.run(["a b"])
    gateway.fakes.postprocess.error = None
    assert await gateway.run(["a b"]) == [expected("a b")]  # and the next request is answered
