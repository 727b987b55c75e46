"""The asynchronous path's shared pieces: the client of the cache service's job records (the one
boundary that sees those calls' gRPC errors), a short-lived cache of job states, and the stage
worker every stage service runs over its queues.

A stage worker, per message (one chunk of a job's items):
    1. drop it (ack) when its job is no longer QUEUED or RUNNING: cancelled, expired, failed,
       or unknown (its record gone after retention);
    2. run the stage on the whole chunk; when that fails with an error of the items
       (ITEM_ERRORS: InvalidInput, NotFound and their kinds), run it item by item, so one bad
       item fails alone, with its error;
    3. publish what succeeded to the next stage (confirmed), or at the last stage record the
       results, and record the failed items, in the cache service;
    4. only then ack (messaging.Consumer acks when the handler returns).
Any other error is not the items' fault, and never becomes their answer (its message may name
server internals). A chunk that fails so goes back to the first stage item by item, so that an
item that crashes a stage is dead-lettered alone and its siblings live. Transient failures
(fmserve.messaging.TRANSIENT: Unavailable, Overloaded, DeadlineExceeded) raise out of the
handler, which the consumer holds and retries without spending a delivery, for a bounded time;
anything else spends one, and a message that fails on every delivery is dead-lettered by
RabbitMQ (`DeadLetters` then fails its items).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Histogram

from fmserve.channels import open_channel
from fmserve.context import remaining_s
from fmserve.errors import (
    DeadlineExceeded,
    FmserveError,
    InvalidInput,
    JobNotFound,
    NotFound,
    Unavailable,
    from_rpc_error,
)
from fmserve.messaging import LEVELS, TRANSIENT, Broker, Consumer, Delivery, Topology
from fmserve.v1 import cache_pb2, cache_pb2_grpc, common_pb2, jobs_pb2

ACTIVE = (jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING)
TERMINAL = (
    jobs_pb2.JOB_STATE_SUCCEEDED,
    jobs_pb2.JOB_STATE_FAILED,
    jobs_pb2.JOB_STATE_CANCELLED,
    jobs_pb2.JOB_STATE_EXPIRED,
)
LEVEL_OF: dict[int, str] = {
    jobs_pb2.JOB_PRIORITY_HIGH: "high",
    jobs_pb2.JOB_PRIORITY_NORMAL: "normal",
    jobs_pb2.JOB_PRIORITY_LOW: "low",
}
NEXT_STAGE = {"preprocess": "inference", "inference": "postprocess", "postprocess": ""}
# Errors that belong to the items themselves (a text too long or empty, a model that does not
# exist): each item is answered with its error. Anything else is the server's problem.
ITEM_ERRORS: tuple[type[FmserveError], ...] = (InvalidInput, NotFound)
CALL_TIMEOUT_S = 10.0

log = logging.getLogger("fmserve.jobs")

ITEMS = Counter(
    "fmserve_job_items_total",
    "Job items leaving a stage, by stage and outcome (forwarded, recorded, failed, dropped, "
    "isolated: re-queued one by one after their chunk failed unexpectedly).",
    ["stage", "outcome"],
)
ITEM_LATENCY = Histogram(
    "fmserve_job_item_latency_seconds",
    "Time from a job item's submission to its answer being recorded, by model.",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)


class JobRecords:
    """The cache service's job RPCs. Failures leave as fmserve errors: NOT_FOUND as
    JobNotFound, UNAVAILABLE (and a timeout) as Unavailable."""

    def __init__(self, address: str, max_message_bytes: int = 64 * 1024 * 1024) -> None:
        self.address = address
        self.max_message_bytes = max_message_bytes
        self._channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        self._channel = open_channel(self.address, self.max_message_bytes)
        self._stub = cache_pb2_grpc.CacheStub(self._channel)

    async def stop(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def create(self, job: jobs_pb2.Job) -> tuple[jobs_pb2.Job, bool]:
        reply = await self._call("CreateJob", cache_pb2.CreateJobRequest(job=job))
        return reply.job, reply.created

    async def seal(self, job_id: str, total: int) -> jobs_pb2.Job:
        return await self._call("SealJob", cache_pb2.SealJobRequest(job_id=job_id, total=total))

    async def get(self, job_id: str) -> jobs_pb2.Job:
        return await self._call("GetJob", jobs_pb2.GetJobRequest(job_id=job_id))

    async def record(self, job_id: str, items: Sequence[jobs_pb2.JobItemResult]) -> int:
        request = cache_pb2.RecordItemsRequest(job_id=job_id, items=items)
        return int((await self._call("RecordItems", request)).recorded)

    async def results(self, job_id: str, start: int, limit: int) -> jobs_pb2.GetJobResultsResponse:
        request = jobs_pb2.GetJobResultsRequest(job_id=job_id, start=start, limit=limit)
        return await self._call("GetJobResults", request)

    async def finish(self, job_id: str, state: Any, error: str) -> jobs_pb2.Job:
        request = cache_pb2.FinishJobRequest(job_id=job_id, state=state, error=error)
        return await self._call("FinishJob", request)

    async def list(self, limit: int) -> list[jobs_pb2.Job]:
        reply = await self._call("ListJobs", jobs_pb2.ListJobsRequest(limit=limit))
        return list(reply.jobs)

    async def _call(self, method: str, request: object) -> Any:
        # What is left of the caller's deadline (the gateway's SubmitJob, GetJob...), at most
        # CALL_TIMEOUT_S; stage workers have no caller, so theirs is CALL_TIMEOUT_S.
        timeout = remaining_s(CALL_TIMEOUT_S)
        try:
            return await getattr(self._stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, callers_deadline=timeout < CALL_TIMEOUT_S) from None


def _translate(exc: grpc.aio.AioRpcError, callers_deadline: bool = False) -> FmserveError:
    code = exc.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and callers_deadline:
        return DeadlineExceeded("the deadline expired while waiting for the job records")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable("the cache service (job records) is unavailable; retry shortly")
    error = from_rpc_error(exc)
    return JobNotFound(error.message) if isinstance(error, NotFound) else error


class JobStates:
    """Whether a job's items are still wanted, asked of the cache service at most once per
    `ttl_s` per job, so a stage checks every chunk without a call per chunk."""

    def __init__(self, records: JobRecords, ttl_s: float = 1.0, max_jobs: int = 10_000) -> None:
        self.records = records
        self.ttl_s = ttl_s
        self.max_jobs = max_jobs
        self._seen: dict[str, tuple[float, bool]] = {}

    async def active(self, job_id: str) -> bool:
        now = time.monotonic()
        seen = self._seen.get(job_id)
        if seen is not None and now - seen[0] < self.ttl_s:
            return seen[1]
        try:
            active = (await self.records.get(job_id)).state in ACTIVE
        except JobNotFound:
            active = False
        if len(self._seen) >= self.max_jobs:
            self._seen.clear()  # a crude bound; the next looks cost one call per job
        self._seen[job_id] = (now, active)
        return active


def failure(index: int, error: FmserveError | str) -> jobs_pb2.JobItemResult:
    """A failed item, with a message for people (the sync path's "texts[0]" means "this text")."""
    message = error if isinstance(error, str) else error.message
    return jobs_pb2.JobItemResult(index=index, error=message.replace("texts[0] ", "the text "))


def decode(body: bytes) -> jobs_pb2.JobChunk:
    try:
        return jobs_pb2.JobChunk.FromString(body)
    except DecodeError as exc:
        # An unreadable message can only be dead-lettered: it names no job to fail.
        raise ValueError("a queue message is not a JobChunk") from exc


def singles(chunk: jobs_pb2.JobChunk) -> list[jobs_pb2.JobChunk]:
    """Each item of a chunk alone, as it entered the first stage (texts only)."""
    return [
        jobs_pb2.JobChunk(
            route=chunk.route,
            indexes=[index],
            texts=[text],
            submitted_unix_ms=chunk.submitted_unix_ms,
        )
        for index, text in zip(chunk.indexes, chunk.texts, strict=True)
    ]


# A stage turns a chunk into the next stage's chunk, or (last stage) one result per item.
StageRun = Callable[[jobs_pb2.JobChunk], Awaitable[jobs_pb2.JobChunk | list[common_pb2.Result]]]
# Splits a chunk into single-item chunks the stage can take (the first stage: `singles`).
# A stage without one fails the whole chunk's items with the chunk's error: only preprocess
# sees raw texts, so only it meets errors that belong to one item.
Splitter = Callable[[jobs_pb2.JobChunk], list[jobs_pb2.JobChunk]] | None


@dataclass
class Outcome:
    forward: list[jobs_pb2.JobChunk]
    results: list[jobs_pb2.JobItemResult]
    failed: list[jobs_pb2.JobItemResult]


class StageWorker:
    """One stage's consumer of its priority queues (see the module docstring)."""

    def __init__(
        self,
        stage: str,
        run: StageRun,
        split: Splitter,
        broker: Broker,
        records: JobRecords,
        states: JobStates,
        prefetch: int = 4,
        concurrency: int = 2,
        grace_s: float = 10.0,
        transient_hold_s: float = 30.0,
    ) -> None:
        self.stage = stage
        self.run = run
        self.split = split
        self.broker = broker
        self.records = records
        self.states = states
        queues = broker.topology.queues(stage)
        self.consumer = Consumer(
            broker, queues, self.handle, stage, prefetch, concurrency, grace_s, transient_hold_s
        )

    async def start(self) -> None:
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()

    async def handle(self, delivery: Delivery) -> None:
        chunk = decode(delivery.body)
        job_id = chunk.route.job_id
        if not await self.states.active(job_id):
            ITEMS.labels(self.stage, "dropped").inc(len(chunk.indexes))
            return
        level = LEVEL_OF.get(chunk.route.priority, "normal")
        try:
            outcome = await self.work(chunk)
        except TRANSIENT:
            raise
        except Exception:  # not the items' fault (see the module docstring)
            if len(chunk.indexes) < 2:
                raise  # spends a delivery; past the limit the item is dead-lettered
            await self._isolate(chunk, level)
            return
        if outcome.forward:
            bodies = [c.SerializeToString() for c in outcome.forward]
            await self.broker.publish(NEXT_STAGE[self.stage], level, bodies)
            ITEMS.labels(self.stage, "forwarded").inc(sum(len(c.indexes) for c in outcome.forward))
        answered = outcome.results + outcome.failed
        if answered:
            await self.records.record(job_id, answered)
            ITEMS.labels(self.stage, "recorded").inc(len(outcome.results))
            ITEMS.labels(self.stage, "failed").inc(len(outcome.failed))
            self._observe_latency(chunk, len(outcome.results))

    async def _isolate(self, chunk: jobs_pb2.JobChunk, level: str) -> None:
        """A chunk failed unexpectedly (a bug, or an item that crashes the model): its items go
        back to the first stage one by one, so only the item at fault is dead-lettered and its
        siblings are answered."""
        log.exception(
            "a chunk of %d items failed unexpectedly; re-queueing its items one by one",
            len(chunk.indexes),
            extra={"stage": self.stage, "job_id": chunk.route.job_id},
        )
        await self.broker.publish(
            "preprocess", level, [c.SerializeToString() for c in singles(chunk)]
        )
        ITEMS.labels(self.stage, "isolated").inc(len(chunk.indexes))

    async def work(self, chunk: jobs_pb2.JobChunk) -> Outcome:
        """The whole chunk at once; item by item when the chunk fails for its items (an
        ITEM_ERRORS error). Any other error propagates."""
        try:
            return self._outcome(chunk, await self.run(chunk))
        except ITEM_ERRORS as exc:
            if len(chunk.indexes) == 1 or self.split is None:
                return Outcome([], [], [failure(i, exc) for i in chunk.indexes])
        total = Outcome([], [], [])
        for one in self.split(chunk):
            part = await self.work(one)
            total.forward += part.forward
            total.results += part.results
            total.failed += part.failed
        return total

    def _outcome(
        self, chunk: jobs_pb2.JobChunk, out: jobs_pb2.JobChunk | list[common_pb2.Result]
    ) -> Outcome:
        if isinstance(out, jobs_pb2.JobChunk):
            return Outcome([out], [], [])
        results = [
            jobs_pb2.JobItemResult(index=i, result=r)
            for i, r in zip(chunk.indexes, out, strict=True)
        ]
        return Outcome([], results, [])

    def _observe_latency(self, chunk: jobs_pb2.JobChunk, count: int) -> None:
        if chunk.submitted_unix_ms and count:
            seconds = max(0.0, time.time() - chunk.submitted_unix_ms / 1000)
            ITEM_LATENCY.labels(chunk.route.model).observe(seconds)


class DeadLetters:
    """Consumes the dead-letter queue: every item of a message that failed on each of its
    deliveries is recorded FAILED (items answered before keep their answer: recording is
    idempotent). Runs in one service (postprocess); a message that names no job is logged."""

    def __init__(
        self,
        broker: Broker,
        records: JobRecords,
        grace_s: float = 10.0,
        transient_hold_s: float = 30.0,
    ) -> None:
        self.broker = broker
        self.records = records
        queues = [broker.topology.dead_letter]
        self.consumer = Consumer(
            broker,
            queues,
            self.handle,
            "dead-letter",
            grace_s=grace_s,
            transient_hold_s=transient_hold_s,
        )

    async def start(self) -> None:
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()

    async def handle(self, delivery: Delivery) -> None:
        try:
            chunk = decode(delivery.body)
        except ValueError:
            size = len(delivery.body)
            log.error("dropped an unreadable dead-lettered message", extra={"bytes": size})
            return
        stage = self.broker.topology.stage_of(delivery.dead_letter_queue) or "a"
        deliveries = self.broker.topology.max_deliveries
        message = (
            f"dropped after {deliveries} deliveries: the {stage} stage failed on this item "
            "every time (its log has the details)"
        )
        failed = [failure(i, message) for i in chunk.indexes]
        try:
            await self.records.record(chunk.route.job_id, failed)
        except JobNotFound:
            return  # the job's record is gone (retention): nothing left to mark
        ITEMS.labels("dead-letter", "failed").inc(len(failed))


def level_of(priority: int) -> str:
    return LEVEL_OF.get(priority, "normal")


assert set(LEVEL_OF.values()) == set(LEVELS)


def stage_resources(
    stage: str, settings: Any, run: StageRun, split: Splitter, dead_letters: bool = False
) -> list[Any]:
    """A stage service's job resources (`settings`: a stage's settings, which are
    ServiceSettings and WorkerSettings both), in start order: the cache client, the broker, the
    worker (and the dead-letter consumer). Stopped in reverse: consumers stop taking messages
    and finish what they hold first, then the broker and the cache client close."""
    if not settings.worker_enabled:
        return []
    records = JobRecords(settings.cache_address, settings.max_message_bytes)
    topology = Topology(settings.amqp_queue_prefix, settings.amqp_delivery_limit)
    broker = Broker(
        settings.amqp_url.get_secret_value(), topology, settings.publish_timeout_s, stage
    )
    states = JobStates(records, settings.job_state_ttl_s)
    worker = StageWorker(
        stage,
        run,
        split,
        broker,
        records,
        states,
        settings.worker_prefetch,
        settings.worker_concurrency,
        settings.grace_period_s,
        settings.worker_transient_hold_s,
    )
    resources: list[Any] = [records, broker, worker]
    if dead_letters:
        hold_s = settings.worker_transient_hold_s
        resources.append(DeadLetters(broker, records, settings.grace_period_s, hold_s))
    return resources
