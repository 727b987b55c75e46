"""A job belongs to the key that submitted it whatever its items: a media job (images) is seen,
read, cancelled and listed by its owner and admins only; any other key gets the NOT_FOUND an
unknown id gets. In-memory records and broker, the test repository's real models (text jobs:
the auth e2e test)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fmserve.core.repository import ModelRepository
from fmserve.errors import JobNotFound
from fmserve.v1 import jobs_pb2
from services.gateway import principal
from services.gateway.jobs import Items, Jobs, Submission
from services.gateway.media import Media
from services.gateway.principal import Principal
from services.gateway.routes import Router
from services.gateway.settings import GatewaySettings
from tests.images import drawn, encoded
from tests.unit.test_gateway_job_limits import FakeBroker, FakeRecords

pytestmark = pytest.mark.timeout(30)

OWNER = Principal("a" * 16, "owner", ("infer:*", "jobs:submit", "jobs:read"), admin=False)
OTHER = Principal("b" * 16, "other", ("infer:*", "jobs:submit", "jobs:read"), admin=False)
ADMIN = Principal("c" * 16, "admin", ("admin",), admin=True)


class Records(FakeRecords):
    """FakeRecords that also answer reads, and list by owner as the cache service does."""

    async def get(self, job_id: str) -> jobs_pb2.Job:
        if job_id not in self.jobs:
            raise JobNotFound.unknown(job_id)
        return self.jobs[job_id]

    async def results(self, job_id: str, start: int, limit: int) -> jobs_pb2.GetJobResultsResponse:
        return jobs_pb2.GetJobResultsResponse(job=await self.get(job_id))

    async def list(self, limit: int, owner: str) -> list[jobs_pb2.Job]:
        return [j for j in self.jobs.values() if not owner or j.owner_key_id == owner][:limit]


@contextlib.contextmanager
def calling_as(caller: Principal) -> Iterator[None]:
    token = principal.current.set(caller)
    try:
        yield
    finally:
        principal.current.reset(token)


@pytest.fixture
def jobs(model_repository: Path) -> Jobs:
    router = Router(ModelRepository(model_repository), 64, 1000)
    return Jobs(router, FakeBroker(), Records(), GatewaySettings())  # type: ignore[arg-type]


async def images(count: int) -> AsyncIterator[Items]:
    yield [Media("image/png", encoded(drawn(seed=i))) for i in range(count)]


async def test_a_media_job_is_its_submitters_and_the_admins_only(jobs: Jobs) -> None:
    with calling_as(OWNER):
        job = await jobs.submit(Submission("tiny-vit"), images(3))
    assert job.owner_key_id == OWNER.key_id and job.total == 3

    unknown = "0" * 32
    with calling_as(OTHER):
        for ask in (jobs.get, jobs.cancel, lambda i: jobs.results(i, 0, 10)):
            with pytest.raises(JobNotFound) as theirs:
                await ask(job.id)
            with pytest.raises(JobNotFound) as nobodys:
                await ask(unknown)
            assert theirs.value.message == nobodys.value.message.replace(unknown, job.id)
        assert await jobs.list(10) == []

    for caller in (OWNER, ADMIN):
        with calling_as(caller):
            assert (await jobs.get(job.id)).id == job.id
            assert (await jobs.results(job.id, 0, 10)).job.id == job.id
            assert [j.id for j in await jobs.list(10)] == [job.id]
            assert (await jobs.cancel(job.id)).id == job.id
