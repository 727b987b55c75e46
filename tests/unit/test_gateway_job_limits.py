"""The gateway's job submission under its limits, with in-memory seams for the router, the job
records and the broker: a job over the item limit is refused before anything is created or
published when its client declares its size, and the moment its count passes the limit when
it does not; a media job's chunks are bounded by bytes, encoded and featurized."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest

from fmserve.client import AsyncClient, Client, wire
from fmserve.core.tasks import TaskName
from fmserve.errors import InvalidInput, TooLarge
from fmserve.queue.topology import Topology
from fmserve.v1 import gateway_pb2, jobs_pb2
from services.gateway import codec
from services.gateway.jobs import Jobs, Submission
from services.gateway.media import Media
from services.gateway.routes import Route
from services.gateway.settings import GatewaySettings

pytestmark = pytest.mark.timeout(10)
LIMIT = 100
CHUNK = 10


ITEM_BYTES = 100  # a media item's featurized bytes


class FakeRouter:
    def route(
        self, model: str, version: str, task: object, truncate: bool, top_k: int, media: bool
    ) -> Route:
        task = TaskName.IMAGE_CLASSIFICATION if media else TaskName.EMBEDDING
        return Route(model, "1", task, truncate, top_k, media, ITEM_BYTES if media else 0)

    def text_problem(self, text: str) -> str | None:
        return None


class FakeRecords:
    """Job records in a dict; counts what was created."""

    def __init__(self) -> None:
        self.jobs: dict[str, jobs_pb2.Job] = {}

    async def create(self, job: jobs_pb2.Job) -> tuple[jobs_pb2.Job, bool]:
        job.id = f"job-{len(self.jobs)}"
        job.state = jobs_pb2.JOB_STATE_QUEUED
        self.jobs[job.id] = job
        return job, True

    async def seal(self, job_id: str, total: int) -> jobs_pb2.Job:
        self.jobs[job_id].total, self.jobs[job_id].sealed = total, True
        return self.jobs[job_id]

    async def record(self, job_id: str, items: Sequence[jobs_pb2.JobItemResult]) -> int:
        return len(items)

    async def finish(self, job_id: str, state: object, error: str) -> jobs_pb2.Job:
        self.jobs[job_id].state, self.jobs[job_id].error = jobs_pb2.JOB_STATE_FAILED, error
        return self.jobs[job_id]


class FakeBroker:
    """Counts the items it was given to publish, and keeps their chunks."""

    def __init__(self) -> None:
        self.topology = Topology("test.")
        self.items = 0
        self.chunks: list[jobs_pb2.JobChunk] = []

    async def publish(self, stage: str, level: str, bodies: Sequence[bytes]) -> None:
        for body in bodies:
            self.chunks.append(jobs_pb2.JobChunk.FromString(body))
            self.items += len(self.chunks[-1].indexes)

    async def ready_messages(self, stage: str) -> int:
        return 0


def new_jobs(**settings: Any) -> tuple[Jobs, FakeRecords, FakeBroker]:
    settings = GatewaySettings(
        job_max_items=LIMIT, job_chunk_size=CHUNK, job_publish_window=2, **settings
    )
    records, broker = FakeRecords(), FakeBroker()
    return Jobs(FakeRouter(), broker, records, settings), records, broker  # type: ignore[arg-type]


async def texts(count: int, per_message: int = 25) -> AsyncIterator[list[str]]:
    for start in range(0, count, per_message):
        yield [f"text {i}" for i in range(start, min(count, start + per_message))]


async def test_a_declared_size_over_the_limit_is_refused_before_anything_happens() -> None:
    jobs, records, broker = new_jobs()
    read = 0

    async def counted() -> AsyncIterator[list[str]]:
        nonlocal read
        async for batch in texts(LIMIT + 1):
            read += len(batch)
            yield batch

    submission = Submission(model="m", expected_items=LIMIT + 1)
    with pytest.raises(TooLarge, match=f"at most {LIMIT} items"):
        await jobs.submit(submission, counted())
    assert (records.jobs, broker.items, read) == ({}, 0, 0)


async def test_an_undeclared_stream_is_refused_the_moment_it_passes_the_limit() -> None:
    jobs, records, broker = new_jobs()
    with pytest.raises(TooLarge, match=f"at most {LIMIT} items"):
        await jobs.submit(Submission(model="m"), texts(10 * LIMIT))
    assert broker.items <= LIMIT  # nothing past the limit was published
    (job,) = records.jobs.values()
    assert job.state == jobs_pb2.JOB_STATE_FAILED and "at most" in job.error


async def test_a_declared_size_within_the_limit_is_taken() -> None:
    jobs, _, broker = new_jobs()
    job = await jobs.submit(Submission(model="m", expected_items=LIMIT), texts(LIMIT))
    assert (job.total, job.sealed, broker.items) == (LIMIT, True, LIMIT)


async def media(*sizes: int) -> AsyncIterator[list[Media]]:
    yield [Media("image/png", b"x" * size) for size in sizes]


async def test_media_chunks_are_bounded_by_encoded_and_featurized_bytes() -> None:
    jobs, _, broker = new_jobs(max_job_chunk_bytes=1000, max_media_batch_bytes=3 * ITEM_BYTES)
    job = await jobs.submit(Submission(model="m"), media(400, 400, 400, 10, 10, 10, 10, 1000))
    assert (job.total, broker.items) == (8, 8)
    sizes = [[len(m.data) for m in chunk.media] for chunk in broker.chunks]
    # 400+400+400 is over 1000 bytes; four small items are over three items' featurized bytes
    assert sizes == [[400, 400], [400, 10, 10], [10, 10], [1000]]
    assert [list(chunk.indexes) for chunk in broker.chunks][-1] == [7]


async def test_a_media_item_over_the_chunk_limit_refuses_the_job_naming_it() -> None:
    jobs, records, _ = new_jobs(max_job_chunk_bytes=1000)
    with pytest.raises(InvalidInput, match=r"media item 1 is 1001 bytes; .* at most 1000"):
        await jobs.submit(Submission(model="m"), media(10, 1001))
    (job,) = records.jobs.values()
    assert job.state == jobs_pb2.JOB_STATE_FAILED and "media item 1" in job.error


async def test_a_job_is_texts_or_media_not_both() -> None:
    async def mixed() -> AsyncIterator[list[str] | list[Media]]:
        yield ["a text"]
        yield [Media("image/png", b"x")]

    jobs, _, _ = new_jobs()
    with pytest.raises(InvalidInput, match="texts or media, not both"):
        await jobs.submit(Submission(model="m"), mixed())


def test_the_header_carries_the_declared_size_to_the_gateway() -> None:
    header = wire.job_header("m", None, "", False, 0, "", "normal", 0, 0)
    header.header.expected_items = 7
    assert codec.submission_to_domain(header).expected_items == 7


@pytest.mark.parametrize(
    ("texts", "size"),
    [
        (["a", "b", "c"], 3),
        (("a",), 1),
        ("one text", 1),
        (iter(["a", "b"]), 0),
        ((t for t in "ab"), 0),
    ],
)
def test_clients_declare_the_size_of_what_has_a_length(texts: object, size: int) -> None:
    assert wire.declared_size(texts) == size


def test_clients_send_media_in_messages_bounded_by_bytes_and_declare_them() -> None:
    png = b"\x89PNG\r\n\x1a\n"
    half = png + bytes(wire.MEDIA_MESSAGE_BYTES // 2)
    messages = list(wire.media_chunks([half, half, half, png], sample_rate=0))
    assert [len(m.items.media) for m in messages] == [1, 1, 2]  # each half is over half
    assert {m.mime_type for m in messages[2].items.media} == {"image/png"}
    assert (wire.declared_media(half), wire.declared_media([half] * 3)) == (1, 3)
    assert wire.declared_media(iter([half])) == 0


class RecordingStub:
    """Takes the place of the gateway: keeps the header of a SubmitJob stream."""

    def __init__(self) -> None:
        self.header: gateway_pb2.JobHeader | None = None
        self.metadata: object = None

    def SubmitJob(
        self, requests: Iterator[gateway_pb2.SubmitJobRequest], timeout: object, metadata: object
    ) -> Any:
        self.header = next(iter(requests)).header
        self.metadata = metadata
        return jobs_pb2.Job(id="j")


class AsyncRecordingStub(RecordingStub):
    async def SubmitJob(  # type: ignore[override]
        self, requests: Any, timeout: object, metadata: object
    ) -> Any:
        self.header = (await anext(aiter(requests))).header
        self.metadata = metadata
        return jobs_pb2.Job(id="j")


def test_the_blocking_client_declares_a_list_and_not_a_generator() -> None:
    with Client("127.0.0.1:9", timeout=1.0) as client:
        client._stub = stub = RecordingStub()  # type: ignore[assignment]
        client.submit(["a", "b", "c"], "m")
        assert stub.header is not None and stub.header.expected_items == 3
        client.submit((t for t in "ab"), "m")
        assert stub.header.expected_items == 0


async def test_the_async_client_declares_a_list() -> None:
    async with AsyncClient("127.0.0.1:9", timeout=1.0) as client:
        client._stub = stub = AsyncRecordingStub()  # type: ignore[assignment]
        await client.submit(["a", "b"], "m")
        assert stub.header is not None and stub.header.expected_items == 2


def test_the_clients_send_their_api_key_as_bearer_metadata_and_nothing_without_one() -> None:
    with Client("127.0.0.1:9", api_key="fms_k_secret") as client:
        client._stub = stub = RecordingStub()  # type: ignore[assignment]
        client.submit(["a"], "m")
        assert stub.metadata == (("authorization", "Bearer fms_k_secret"),)
    with Client("127.0.0.1:9") as client:
        client._stub = stub = RecordingStub()  # type: ignore[assignment]
        client.submit(["a"], "m")
        assert stub.metadata == ()


async def test_the_async_client_sends_its_api_key() -> None:
    async with AsyncClient("127.0.0.1:9", api_key="fms_k_secret") as client:
        client._stub = stub = AsyncRecordingStub()  # type: ignore[assignment]
        await client.submit(["a"], "m")
        assert stub.metadata == (("authorization", "Bearer fms_k_secret"),)
