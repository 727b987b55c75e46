"""The stage worker every stage service runs over its queues.

A stage worker, per message (one chunk of a job's items):
    1. drop it (ack) when its job is no longer QUEUED or RUNNING: cancelled, expired, failed,
       or unknown (its record gone after retention);
    2. run the stage on the whole chunk, checking every `job_state_ttl_s` that the job is still
       active: when it has ended (a client cancelled it, it expired), the work is cancelled and
       the chunk dropped, so a long chunk (a generation job's) never runs on for nobody;
       when the stage fails with an error of the items
       (ITEM_ERRORS: InvalidInput, NotFound and their kinds), run it item by item, so one bad
       item fails alone, with its error;
    3. publish what succeeded to the next stage (confirmed), or at the last stage record the
       results, and record the failed items, in the cache service;
    4. only then ack (fmserve.queue.consumer.Consumer acks when the handler returns).
Any other error is not the items' fault, and never becomes their answer (its message may name
server internals). A chunk that fails so goes back to the first stage item by item, so that an
item that crashes a stage is dead-lettered alone and its siblings live. Transient failures
(fmserve.queue.consumer.TRANSIENT: Unavailable, Overloaded, DeadlineExceeded) raise out of the
handler, which the consumer holds and retries without spending a delivery, for a bounded time;
anything else spends one, and a message that fails on every delivery is dead-lettered by
RabbitMQ (`DeadLetters` then fails its items).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fmserve.errors import FmserveError, InvalidInput, NotFound
from fmserve.queue.broker import Broker
from fmserve.queue.chunks import decode, failure, singles
from fmserve.queue.consumer import TRANSIENT, Consumer, Delivery
from fmserve.queue.dead_letters import DeadLetters
from fmserve.queue.metrics import ITEM_LATENCY, ITEMS
from fmserve.queue.records import JobRecords, JobStates
from fmserve.queue.topology import LEVELS, Topology
from fmserve.rpc import tls
from fmserve.v1 import common_pb2, jobs_pb2

LEVEL_OF: dict[int, str] = {
    jobs_pb2.JOB_PRIORITY_HIGH: "high",
    jobs_pb2.JOB_PRIORITY_NORMAL: "normal",
    jobs_pb2.JOB_PRIORITY_LOW: "low",
}
NEXT_STAGE = {"preprocess": "inference", "inference": "postprocess", "postprocess": ""}
# Errors that belong to the items themselves (a text too long or empty, a model that does not
# exist): each item is answered with its error. Anything else is the server's problem.
ITEM_ERRORS: tuple[type[FmserveError], ...] = (InvalidInput, NotFound)

log = logging.getLogger("fmserve.queue.worker")


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
            outcome = await self._while_active(job_id, self.work(chunk))
        except TRANSIENT:
            raise
        except Exception:  # not the items' fault (see the module docstring)
            if len(chunk.indexes) < 2:
                raise  # spends a delivery; past the limit the item is dead-lettered
            await self._isolate(chunk, level)
            return
        if outcome is None:  # the job ended while the chunk ran
            ITEMS.labels(self.stage, "dropped").inc(len(chunk.indexes))
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

    async def _while_active(
        self, job_id: str, work: Coroutine[Any, Any, Outcome]
    ) -> Outcome | None:
        """The work's outcome, or None once the job has ended: the work is then cancelled (a
        generation's sequences leave the batch at the scheduler's next step)."""
        task = asyncio.ensure_future(work)
        try:
            while not (await asyncio.wait({task}, timeout=self.states.ttl_s))[0]:
                if not await self._active(job_id):
                    return None
            return task.result()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _active(self, job_id: str) -> bool:
        """Whether the job is still wanted; while the cache service cannot say, the work goes
        on (recording its items will meet the outage, and retry)."""
        try:
            return await self.states.active(job_id)
        except FmserveError as error:
            log.warning("could not check a running chunk's job: %s", error.message)
            return True

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
    records = JobRecords(settings.cache_address, settings.max_message_bytes, tls.load(settings))
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
