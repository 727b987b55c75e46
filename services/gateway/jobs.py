"""The gateway's side of batch jobs: submission (validate, create the record, publish the items
in chunks with confirms, seal), and reading, watching, cancelling and listing jobs, whose
records the cache service owns.

Accepted means durable: `submit` returns only after the record exists and RabbitMQ has
confirmed every chunk. Items travel in chunks of `job_chunk_size` (matched to the model's
batches); publishes are pipelined, up to `job_publish_window` chunks awaiting their confirms
while the stream goes on, so a big submission never sits in memory whole.

A job is texts, or a media model's media (images, audio clips), never both: its first items
decide which, and the route (preprocess tokenizes the texts, or featurizes the media). A media
job's chunks are also bounded by bytes, so every queue message stays small: as many items as
fit `max_media_batch_bytes` once featurized (as the sync path's batches), and `max_job_chunk_bytes`
of encoded media.

Item content is checked per item: an empty or over-long text, or an empty media item, is
recorded FAILED with its reason (one bad line must not sink a 100,000-item job); submission-level
problems (unknown model or task, no items, texts and media mixed, a media item too large for a
queue message, too many items declared or sent, a full job queue: `backlog.py`) refuse the
submission. A submission that breaks off after its record was created (too many items, a job
queue that filled, the client went away, RabbitMQ down past the timeout) marks the job FAILED
with the reason, so it never waits for items that will not come. While the stream is open the
submission renews its job's lease in the cache service; if the gateway dies and the lease
lapses, the cache service marks the job FAILED itself. A second submission with the idempotency
key of one still streaming is refused (FAILED_PRECONDITION), never joined.

A text-generation job (task TEXT_GENERATION) treats each text as a prompt: its sampling
parameters are checked at submission as Generate checks them (bad ones refuse the job at once)
and travel, max_new_tokens resolved, on every chunk's route; each item's result is its finished
generation. Such jobs skip the result cache: a job's items are answered once and kept with the
job, and only the Generate path reads and fills the cache.

Ownership (with auth on): a job records the key id that submitted it; only that key, or an
admin key, can read, watch, cancel or list it. Another key gets the very answer an unknown id
gets (NOT_FOUND), so job ids cannot be probed; idempotency keys are per owner too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from fmserve.core import tracing
from fmserve.core.jobs import JobState
from fmserve.core.tasks import TASK_TO_WIRE, TaskName
from fmserve.errors import (
    FmserveError,
    InvalidInput,
    JobNotFound,
    TooLarge,
    Unavailable,
)
from fmserve.queue.broker import Broker
from fmserve.queue.chunks import failure
from fmserve.queue.records import JobRecords
from fmserve.queue.stage_worker import level_of
from fmserve.v1 import common_pb2, jobs_pb2
from services.gateway import principal, sampling_codec
from services.gateway.backlog import Backlog
from services.gateway.media import Media, media_problem, media_to_wire
from services.gateway.routes import Route, Router
from services.gateway.sampling import Sampling, StopLimits, checked
from services.gateway.settings import GatewaySettings
from services.gateway.watchers import Watchers

log = logging.getLogger("fmserve.gateway.jobs")


@dataclass
class Submission:
    model: str
    version: str = ""
    task: TaskName | None = None
    truncate: bool = False
    top_k: int = 0
    idempotency_key: str = ""
    priority: int = jobs_pb2.JOB_PRIORITY_NORMAL
    retention_s: int = 0
    timeout_s: int = 0
    expected_items: int = 0
    """How many items the client said will follow (0: not said)."""
    sampling: Sampling | None = None
    """A text-generation job's parameters (None: the defaults); refused on other tasks."""


Items = list[str] | list[Media]
"""One SubmitJob message's items: texts, or a media model's media."""

MIXED = "a job is texts or media, not both: submit each kind as a job of its own"


# What SubmitJob answers on a cluster running without RabbitMQ (jobs_enabled=false).
JOBS_OFF = (
    "batch jobs are off in this cluster (it runs without RabbitMQ); the synchronous API works. "
    "Start RabbitMQ and restart the cluster to submit jobs"
)


# What became of a submission that broke off: its record says FAILED and why.
NOT_ACCEPTED = "the job was not accepted (it is marked FAILED): submit it again later"


class Jobs:
    """`broker` is None when jobs are off: submissions are refused, records still read."""

    def __init__(
        self, router: Router, broker: Broker | None, records: JobRecords, settings: GatewaySettings
    ) -> None:
        self.router = router
        self.broker = broker
        self.records = records
        self.settings = settings
        self.stop_limits = StopLimits.of(settings)
        limit, every_s = settings.job_queue_max_messages, settings.job_queue_depth_cache_s
        self.backlog = Backlog(broker, limit, every_s) if broker else None
        self.watchers = Watchers(
            records,
            settings.job_watch_interval_s,
            settings.max_watchers,
            settings.max_watchers_per_connection,
        )

    async def submit(self, submission: Submission, items: AsyncIterator[Items]) -> jobs_pb2.Job:
        if self.broker is None:
            raise Unavailable(JOBS_OFF)
        s = submission
        if s.priority not in jobs_pb2.JobPriority.values():
            raise InvalidInput(f"unknown priority {s.priority}; use NORMAL, HIGH or LOW")
        await self._admit(s)
        first = await _first_items(items)  # texts or media: the route depends on which
        media = bool(first) and isinstance(first[0], Media)
        route = self.router.route(s.model, s.version, s.task, s.truncate, s.top_k, media=media)
        parameters = self._parameters(route, s.sampling)
        if not first:
            raise InvalidInput("the job has no items: send at least one text or media item")
        job, created = await self.records.create(self._template(route, s))
        if not created:
            return job  # the same idempotency key: that job, sealed or ended
        lease = asyncio.create_task(self._keep_lease(job.id))
        try:
            publication = _Publication(self, job, route, parameters, s.expected_items)
            total = await publication.run(first, items)
        except BaseException as exc:
            await asyncio.shield(self._broke_off(job.id, exc))
            if isinstance(exc, Unavailable):  # say what became of the job, not only why
                raise Unavailable(f"{exc.message}, so {NOT_ACCEPTED}") from exc
            raise
        finally:
            lease.cancel()
        return await self.records.seal(job.id, total)

    def _parameters(
        self, route: Route, sampling: Sampling | None
    ) -> common_pb2.SamplingParameters | None:
        """A generation job's parameters, checked as Generate checks them, with max_new_tokens
        resolved so every stage (and every item) sees the same values; None for other tasks."""
        if route.task is not TaskName.TEXT_GENERATION:
            if sampling is not None:
                raise InvalidInput(
                    f"parameters apply to text-generation jobs only; model {route.model!r} "
                    f"does {route.task.value}"
                )
            return None
        config = self.router.repository.get(route.model)
        return sampling_codec.to_wire(checked(sampling or Sampling(), config, self.stop_limits))

    async def _keep_lease(self, job_id: str) -> None:
        """Renew the job's submission lease until cancelled; a failed renewal is logged and
        retried (the lease outlasts several intervals)."""
        while True:
            await asyncio.sleep(self.settings.job_lease_renew_s)
            try:
                await self.records.renew(job_id)
            except FmserveError as error:
                log.warning("could not renew a submission's lease: %s", error.message)

    async def _admit(self, s: Submission) -> None:
        """Refuse what cannot be taken before anything is created or published."""
        if s.expected_items > self.settings.job_max_items:
            raise TooLarge(_too_many(self.settings.job_max_items))
        if self.backlog:
            await self.backlog.check()

    def _template(self, route: Route, s: Submission) -> jobs_pb2.Job:
        expires = int(time.time() * 1000) + s.timeout_s * 1000 if s.timeout_s > 0 else 0
        if s.retention_s < 0 or s.timeout_s < 0:
            raise InvalidInput("retention_s and timeout_s must be 0 (the default) or positive")
        return jobs_pb2.Job(
            model=route.model,
            version=route.version,
            task=TASK_TO_WIRE[route.task],
            priority=s.priority,  # type: ignore[arg-type]
            retention_s=s.retention_s or self.settings.job_retention_s,
            expires_unix_ms=expires,
            idempotency_key=s.idempotency_key,
            trace_id=tracing.current_trace_id(),
            owner_key_id=_caller_id(),
        )

    async def _broke_off(self, job_id: str, exc: BaseException) -> None:
        reason = exc.message if isinstance(exc, FmserveError) else "the client went away"
        try:
            await self.records.finish(
                job_id, JobState.FAILED, f"the submission broke off: {reason}"
            )
        except FmserveError as error:  # already ended, or the cache is down: say so, go on
            log.warning("could not mark a broken-off job failed: %s", error.message)

    async def get(self, job_id: str) -> jobs_pb2.Job:
        return _visible(await self.records.get(job_id))

    async def results(self, job_id: str, start: int, limit: int) -> jobs_pb2.GetJobResultsResponse:
        page = await self.records.results(job_id, start, limit)
        _visible(page.job)
        return page

    async def cancel(self, job_id: str) -> jobs_pb2.Job:
        await self.get(job_id)  # the owner never changes: checked once, before the change
        return await self.records.finish(job_id, JobState.CANCELLED, "cancelled by a client")

    async def list(self, limit: int) -> list[jobs_pb2.Job]:
        caller = principal.current.get()
        owner = caller.key_id if caller is not None and not caller.admin else ""
        return await self.records.list(limit, owner)

    async def watch(self, job_id: str, peer: str = "") -> AsyncGenerator[jobs_pb2.Job, None]:
        """The record now, then on every change of state or progress, until it is terminal;
        one poll per job shared by all its watchers, and bounded (`watchers.py`)."""
        await self.get(job_id)
        async with contextlib.aclosing(self.watchers.watch(job_id, peer)) as jobs:
            async for job in jobs:
                yield job


def _caller_id() -> str:
    caller = principal.current.get()
    return caller.key_id if caller is not None else ""


def _visible(job: jobs_pb2.Job) -> jobs_pb2.Job:
    """The job, if the caller may see it (see the module's docstring)."""
    caller = principal.current.get()
    if caller is None or caller.admin or job.owner_key_id == caller.key_id:
        return job
    raise JobNotFound.unknown(job.id)


def _chunk_items(route: Route, settings: GatewaySettings) -> int:
    """Items per chunk: one inference batch; for media, no more than the sync path's batches
    hold once featurized (`max_media_batch_bytes`), since the chunk carries those inputs."""
    if not route.media:
        return settings.job_chunk_size
    return min(settings.job_chunk_size, route.items_fitting(settings.max_media_batch_bytes))


def _too_many(limit: int) -> str:
    return f"a job holds at most {limit} items; split it into several jobs"


async def _first_items(items: AsyncIterator[Items]) -> Items:
    async for batch in items:
        if batch:
            return batch
    return []


class _Publication:
    """One submission's items on their way to the preprocess queue, in chunks."""

    def __init__(
        self,
        jobs: Jobs,
        job: jobs_pb2.Job,
        route: Route,
        parameters: common_pb2.SamplingParameters | None,
        expected_items: int,
    ) -> None:
        self.jobs = jobs
        self.settings = jobs.settings
        self.expected_items = expected_items
        """Declared by the client (0: not said): never more, since a key's daily quota was
        charged for them."""
        self.job = job
        self.chunk = jobs_pb2.JobChunk(
            route=jobs_pb2.JobRoute(
                job_id=job.id,
                model=route.model,
                version=route.version,
                task=TASK_TO_WIRE[route.task],
                truncate=route.truncate,
                top_k=route.top_k,
                priority=job.priority,
                parameters=parameters,
            )
        )
        self.level = level_of(job.priority)
        self.media = route.media
        self.chunk_items = _chunk_items(route, jobs.settings)
        self.chunk_bytes = 0
        """Encoded media bytes in the chunk being filled."""
        self.count = 0
        self.pending: set[asyncio.Task[None]] = set()
        self.failed: list[jobs_pb2.JobItemResult] = []

    async def run(self, first: Items, rest: AsyncIterator[Items]) -> int:
        """Publish every item; returns how many there were."""
        try:
            await self._add(first)
            async for items in rest:
                await self._add(items)
            await self._flush()
            await self._settle(everything=True)
        finally:
            for task in self.pending:
                task.cancel()
        return self.count

    async def _add(self, items: Items) -> None:
        if self.count + len(items) > self.settings.job_max_items:
            raise TooLarge(_too_many(self.settings.job_max_items))
        if self.expected_items and self.count + len(items) > self.expected_items:
            raise InvalidInput(
                f"the job sends more items than the {self.expected_items} its header declared "
                "(expected_items)"
            )
        if items and isinstance(items[0], Media) != self.media:
            raise InvalidInput(MIXED)
        for item in items:
            if isinstance(item, Media):
                await self._make_room(self.count, item)
            self._take(self.count, item)
            self.count += 1
            if len(self.chunk.indexes) >= self.chunk_items:
                await self._flush()

    async def _make_room(self, index: int, item: Media) -> None:
        """Publish the chunk first if this item's bytes would take it over the limit."""
        size, limit = len(item.data), self.settings.max_job_chunk_bytes
        if size > limit:
            raise InvalidInput(
                f"media item {index} is {size} bytes; a job's item may be at most {limit} "
                "(FMSERVE_GATEWAY_MAX_JOB_CHUNK_BYTES): send it smaller (resized, re-encoded), "
                "or to Infer"
            )
        if self.chunk_bytes + size > limit:
            await self._flush()

    def _take(self, index: int, item: str | Media) -> None:
        if problem := self._problem(item):
            self.failed.append(failure(index, problem))
            return
        self.chunk.indexes.append(index)
        if isinstance(item, Media):
            self.chunk.media.append(media_to_wire(item))
            self.chunk_bytes += len(item.data)
        else:
            self.chunk.texts.append(item)

    def _problem(self, item: str | Media) -> str | None:
        """Why the item fails, worded for the job's owner, or None."""
        if isinstance(item, Media):
            problem = media_problem(item)
            return problem and f"the media item {problem}"
        problem = self.jobs.router.text_problem(item)
        return problem and f"the text {problem}"

    async def _flush(self) -> None:
        if self.failed:
            failed, self.failed = self.failed, []
            await self.jobs.records.record(self.job.id, failed)
        if not self.chunk.indexes:
            return
        self.chunk.submitted_unix_ms = int(time.time() * 1000)
        body = self.chunk.SerializeToString()
        del self.chunk.indexes[:]
        del self.chunk.texts[:]
        del self.chunk.media[:]
        self.chunk_bytes = 0
        # Jobs.submit refuses without a broker
        assert self.jobs.broker is not None and self.jobs.backlog is not None
        await self.jobs.backlog.check()  # a full queue stops a stream between chunks too
        publish = self.jobs.broker.publish("preprocess", self.level, [body])
        self.pending.add(asyncio.ensure_future(publish))
        if len(self.pending) >= self.settings.job_publish_window:
            await self._settle(everything=False)

    async def _settle(self, everything: bool) -> None:
        """Wait for confirms: all of them, or at least one (the window has room again)."""
        if not self.pending:
            return
        how = asyncio.ALL_COMPLETED if everything else asyncio.FIRST_COMPLETED
        done, self.pending = await asyncio.wait(self.pending, return_when=how)
        for task in done:
            task.result()  # a publish that failed fails the submission
