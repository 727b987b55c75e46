"""The names and shape of the asynchronous path in RabbitMQ, declared idempotently by every
service at start (names under FMSERVE_AMQP_QUEUE_PREFIX):

    {prefix}{stage}.{level}   quorum queue per stage (preprocess, inference, postprocess) and
                              priority level (high, normal, low): x-delivery-limit, dead-letters
                              to {prefix}dead-letter (at-least-once, so reject-publish overflow)
    {prefix}dead-letter       fanout exchange and quorum queue of messages that failed too often

Why a queue per priority level: quorum queues (the durable, replicated kind that counts
deliveries and dead-letters poison messages) have no message priorities; classic queues do, but
lose those safety properties. A consumer takes the levels' messages into one local scheduler
that always runs the highest waiting level first (`fmserve.queue.consumer.Consumer`).

Delivery limit: a quorum queue's x-delivery-limit N counts *re*deliveries, so RabbitMQ delivers a
message N + 1 times (`Topology.max_deliveries`) and dead-letters it when the last one fails.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import aio_pika

STAGES = ("preprocess", "inference", "postprocess")
LEVELS = ("high", "normal", "low")
"""Priority levels, highest first (the order a consumer drains them)."""


@dataclass(frozen=True)
class Topology:
    """Every name the asynchronous path uses, under one prefix."""

    prefix: str = "fmserve."
    delivery_limit: int = 5
    """The queues' x-delivery-limit: how many times a message is *re*delivered."""

    def queue(self, stage: str, level: str = "normal") -> str:
        return f"{self.prefix}{stage}.{level}"

    def queues(self, stage: str) -> list[str]:
        return [self.queue(stage, level) for level in LEVELS]

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}dead-letter"

    @property
    def max_deliveries(self) -> int:
        """How many times RabbitMQ delivers a message before dead-lettering it: the first
        delivery and `delivery_limit` redeliveries."""
        return self.delivery_limit + 1

    def all_queues(self) -> list[str]:
        return [q for stage in STAGES for q in self.queues(stage)] + [self.dead_letter]

    def stage_of(self, queue: str) -> str:
        """The stage a queue belongs to (its name without prefix and level)."""
        return queue.removeprefix(self.prefix).rsplit(".", 1)[0]


async def declare(channel: aio_pika.abc.AbstractChannel, topology: Topology) -> None:
    """The whole topology, idempotently (declaring what exists with the same arguments is a
    no-op; different arguments are refused by RabbitMQ: PRECONDITION_FAILED)."""
    dead = await channel.declare_exchange(
        topology.dead_letter, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dlq = await channel.declare_queue(
        topology.dead_letter, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dlq.bind(dead)
    arguments: Any = {
        "x-queue-type": "quorum",
        "x-delivery-limit": topology.delivery_limit,
        "x-dead-letter-exchange": topology.dead_letter,
        # at-least-once dead-lettering: a message is not lost between the two queues
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    for stage in STAGES:
        for queue in topology.queues(stage):
            await channel.declare_queue(queue, durable=True, arguments=arguments)


async def delete_queues(url: str, topology: Topology) -> None:
    """Delete every queue and exchange of a topology (tests clean up with it)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for name in topology.all_queues():
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
        with contextlib.suppress(Exception):
            await channel.exchange_delete(topology.dead_letter)
