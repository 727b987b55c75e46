"""The gateway's side of a text-generation job, with in-memory records and broker and the test
repository's real models: sampling parameters checked at submission as Generate checks them
(nothing created or published when they are bad), refused on any other task, and carried
checked, max_new_tokens resolved, on every chunk's route; the wire conversion both ways."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fmserve.core.repository import ModelRepository
from fmserve.core.tasks import TaskName
from fmserve.errors import InvalidInput
from fmserve.v1 import jobs_pb2
from services.gateway import sampling_codec
from services.gateway.jobs import Jobs, Submission
from services.gateway.routes import Router
from services.gateway.sampling import Sampling
from services.gateway.settings import GatewaySettings
from tests.unit.test_gateway_job_limits import FakeBroker, FakeRecords

pytestmark = pytest.mark.timeout(30)


class KeptBroker(FakeBroker):
    """Keeps the chunks it was given to publish."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[jobs_pb2.JobChunk] = []

    async def publish(self, stage: str, level: str, bodies: list[bytes]) -> None:
        self.chunks += [jobs_pb2.JobChunk.FromString(body) for body in bodies]


@pytest.fixture
def records() -> FakeRecords:
    return FakeRecords()


@pytest.fixture
def broker() -> KeptBroker:
    return KeptBroker()


@pytest.fixture
def jobs(model_repository: Path, records: FakeRecords, broker: KeptBroker) -> Jobs:
    router = Router(ModelRepository(model_repository), 64, 1000)
    settings = GatewaySettings(max_stop_strings=4, job_chunk_size=2)
    return Jobs(router, broker, records, settings)  # type: ignore[arg-type]


async def prompts(count: int) -> AsyncIterator[list[str]]:
    yield [f"prompt {i}" for i in range(count)]


async def test_every_chunk_carries_the_checked_parameters(jobs: Jobs, broker: KeptBroker) -> None:
    sampling = Sampling(temperature=0.5, seed=3, stop=("\n",))
    submission = Submission("tiny-llama", task=TaskName.TEXT_GENERATION, sampling=sampling)

    job = await jobs.submit(submission, prompts(5))

    assert job.total == 5 and [len(c.texts) for c in broker.chunks] == [2, 2, 1]
    for chunk in broker.chunks:
        parameters = sampling_codec.to_domain(chunk.route.parameters)
        assert parameters == Sampling(max_new_tokens=16, temperature=0.5, seed=3, stop=("\n",))


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        (Sampling(temperature=-1), "temperature must be >= 0"),
        (Sampling(max_new_tokens=129), "max_new_tokens must be 1 to 128"),
        (Sampling(stop=("a",) * 5), "stop has 5 strings; the limit is 4"),
    ],
)
async def test_bad_parameters_refuse_the_job_before_anything_exists(
    jobs: Jobs, records: FakeRecords, broker: KeptBroker, sampling: Sampling, message: str
) -> None:
    submission = Submission("tiny-llama", task=TaskName.TEXT_GENERATION, sampling=sampling)

    with pytest.raises(InvalidInput, match=message):
        await jobs.submit(submission, prompts(3))
    assert records.jobs == {} and broker.chunks == []


async def test_parameters_on_another_task_are_refused(jobs: Jobs) -> None:
    with pytest.raises(InvalidInput, match="text-generation jobs only; model 'minilm-embed'"):
        await jobs.submit(Submission("minilm-embed", sampling=Sampling()), prompts(1))


async def test_an_encoder_job_carries_no_parameters(jobs: Jobs, broker: KeptBroker) -> None:
    await jobs.submit(Submission("minilm-embed"), prompts(1))

    [chunk] = broker.chunks
    assert not chunk.route.HasField("parameters")


@pytest.mark.parametrize(
    "sampling",
    [Sampling(max_new_tokens=8), Sampling(7, 0.7, 0.9, 40, 11, 1.2, ("a", "b"), (2, 3))],
)
def test_the_wire_form_reads_back_the_same(sampling: Sampling) -> None:
    assert sampling_codec.to_domain(sampling_codec.to_wire(sampling)) == sampling
