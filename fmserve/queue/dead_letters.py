"""The dead-letter queue's consumer: items of a message that failed on every delivery are
recorded FAILED, so their job still finishes."""

from __future__ import annotations

import logging

from fmserve.errors import JobNotFound
from fmserve.queue.broker import Broker
from fmserve.queue.chunks import decode, failure
from fmserve.queue.consumer import Consumer, Delivery
from fmserve.queue.metrics import ITEMS
from fmserve.queue.records import JobRecords

log = logging.getLogger("fmserve.queue.dead_letters")


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
