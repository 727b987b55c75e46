"""The stage worker's (fmserve.queue.stage_worker) rule for a chunk that fails: an error of the
items (InvalidInput, NotFound) becomes their answer, item by item where the stage can split the
chunk; any other error propagates, so the consumer's isolation and dead-lettering handle it and
no server message (a path, a library's text) becomes an item's answer. Pure: nothing is
connected."""

from __future__ import annotations

import asyncio

import pytest

from fmserve.errors import (
    DeadlineExceeded,
    FmserveError,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    Unavailable,
)
from fmserve.queue.broker import Broker
from fmserve.queue.chunks import singles
from fmserve.queue.consumer import Delivery
from fmserve.queue.records import JobRecords, JobStates
from fmserve.queue.stage_worker import Outcome, Splitter, StageRun, StageWorker
from fmserve.queue.topology import Topology
from fmserve.v1 import common_pb2, jobs_pb2
from services.preprocess.worker import media_alone

pytestmark = pytest.mark.timeout(10)


def worker(run: StageRun, split: Splitter = singles) -> StageWorker:
    # Nothing here connects: work() only calls the stage.
    records = JobRecords("127.0.0.1:1")
    broker = Broker("amqp://guest:guest@127.0.0.1:1/", Topology("unit."), name="unit")
    return StageWorker("preprocess", run, split, broker, records, JobStates(records))


def chunk(*texts: str) -> jobs_pb2.JobChunk:
    route = jobs_pb2.JobRoute(job_id="j", model="m")
    return jobs_pb2.JobChunk(route=route, indexes=list(range(len(texts))), texts=texts)


def failing_on(word: str, error: Exception) -> StageRun:
    async def run(c: jobs_pb2.JobChunk) -> jobs_pb2.JobChunk:
        if word in c.texts:
            raise error
        return c

    return run


async def test_an_invalid_item_fails_alone_and_its_siblings_go_on() -> None:
    # Worded for a job by the stage (services/preprocess/worker.py), answered as it stands.
    run = failing_on("", InvalidInput("the text is empty or only whitespace; send some text"))

    outcome = await worker(run).work(chunk("a", "", "c"))

    assert [c.indexes[0] for c in outcome.forward] == [0, 2]
    assert [(f.index, f.error) for f in outcome.failed] == [
        (1, "the text is empty or only whitespace; send some text")
    ]


async def test_without_a_splitter_an_item_error_answers_every_item() -> None:
    run = failing_on("a", ModelNotFound("unknown model 'm'"))

    outcome = await worker(run, split=None).work(chunk("a", "b"))

    assert [(f.index, f.error) for f in outcome.failed] == [
        (0, "unknown model 'm'"),
        (1, "unknown model 'm'"),
    ]


@pytest.mark.parametrize("texts", [("a", "b", "c"), ("a",)])
async def test_an_unexpected_error_is_never_an_items_answer(texts: tuple[str, ...]) -> None:
    # The plain base class: a server fault (e.g. a tokenizer that cannot load), whose message
    # may name server folders. It propagates: the caller re-queues the items one by one and a
    # single item that keeps failing is dead-lettered.
    run = failing_on("a", FmserveError("cannot load the tokenizer in /srv/models/m/1: boom"))

    with pytest.raises(FmserveError, match="/srv/models"):
        await worker(run).work(chunk(*texts))


@pytest.mark.parametrize(
    "error", [Unavailable("not ready"), Overloaded("queue full"), DeadlineExceeded("late")]
)
async def test_transient_errors_propagate(error: FmserveError) -> None:
    with pytest.raises(type(error)):
        await worker(failing_on("b", error)).work(chunk("a", "b"))


# --- a job that ends while its chunk runs ------------------------------------------------------


class EndingStates(JobStates):
    """An in-memory seam: the job is active for its first `looks`, then it has ended."""

    def __init__(self, looks: int) -> None:
        super().__init__(JobRecords("127.0.0.1:1"), ttl_s=0.01)
        self.looks = looks

    async def active(self, job_id: str) -> bool:
        self.looks -= 1
        return self.looks >= 0


def watched(run: StageRun, states: JobStates) -> StageWorker:
    broker = Broker("amqp://guest:guest@127.0.0.1:1/", Topology("unit."), name="unit")
    return StageWorker("inference", run, None, broker, states.records, states)


async def test_a_chunk_whose_job_ends_while_it_runs_is_cancelled_and_dropped() -> None:
    cancelled = asyncio.Event()

    async def run(c: jobs_pb2.JobChunk) -> jobs_pb2.JobChunk:
        try:
            await asyncio.sleep(60)  # a long generation
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return c

    # Returns without publishing or recording anything (neither is connected here).
    await watched(run, EndingStates(looks=3)).handle(
        Delivery(chunk("a").SerializeToString(), "q", 1)
    )

    assert cancelled.is_set()


async def test_a_chunk_that_outlasts_several_looks_is_answered() -> None:
    async def run(c: jobs_pb2.JobChunk) -> jobs_pb2.JobChunk:
        await asyncio.sleep(0.1)
        return c

    w = watched(run, EndingStates(looks=1000))
    outcome = await w._while_active("j", w.work(chunk("a")))

    assert isinstance(outcome, Outcome) and [c.texts[0] for c in outcome.forward] == ["a"]


async def test_a_bad_media_item_fails_alone_worded_for_the_job() -> None:
    """The preprocess stage's own wording (media_alone) of a featurizer's "media[0] …"."""

    async def run(c: jobs_pb2.JobChunk) -> jobs_pb2.JobChunk:
        if any(m.data == b"bad" for m in c.media):
            if len(c.media) > 1:
                raise InvalidInput("media[1] is not a readable image/png image")
            raise media_alone(InvalidInput("media[0] is not a readable image/png image"))
        return c

    media = [common_pb2.Media(mime_type="image/png", data=d) for d in (b"a", b"bad", b"c")]
    route = jobs_pb2.JobRoute(job_id="j", model="m")
    outcome = await worker(run).work(jobs_pb2.JobChunk(route=route, indexes=[4, 5, 6], media=media))

    assert [(c.indexes[0], c.media[0].data) for c in outcome.forward] == [(4, b"a"), (6, b"c")]
    assert not any(c.texts for c in outcome.forward)
    assert [(f.index, f.error) for f in outcome.failed] == [
        (5, "the media item is not a readable image/png image")
    ]
