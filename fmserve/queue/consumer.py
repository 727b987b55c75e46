"""Consuming (aio-pika): manual acks and a bounded prefetch per queue. `Consumer` owns ack/nack,
retries, redelivery counts and metrics; a handler only does the work:
    - returns             → ack
    - raises TRANSIENT    → (Unavailable, Overloaded, DeadlineExceeded: a store or broker hiccup,
                            a model not ready, a full batcher) the message stays unacked and the
                            handler is retried with backoff, spending no delivery; the concurrency
                            slot is given up during each pause. The hold is bounded
                            (`transient_hold_s`): an error that does not pass (a model whose files
                            are broken raises Unavailable every time) then counts like any other
    - raises other        → nack with requeue: one delivery spent
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
)

from fmserve.core import tracing
from fmserve.errors import DeadlineExceeded, FmserveError, Overloaded, Unavailable
from fmserve.queue.broker import (
    MAX_RECONNECT_INTERVAL_S,
    RECONNECT_INTERVAL_S,
    Broker,
    queue_depth,
    translated,
)
from fmserve.queue.metrics import (
    CONSUMED,
    DEAD_LETTERED,
    DEPTH,
    HANDLE_DURATION,
    OUTCOMES,
    REDELIVERED,
    declare_stage,
)

log = logging.getLogger("fmserve.queue")

RETRY_PAUSE_S = 0.5
MAX_RETRY_PAUSE_S = 5.0
DEPTH_EVERY_S = 5.0

# Errors that say nothing about the message itself: the consumer holds the message and retries
# it without spending a delivery (see the module docstring). Defined here, the lower layer, so
# that the stage worker and the consumer agree by construction.
TRANSIENT: tuple[type[FmserveError], ...] = (Unavailable, Overloaded, DeadlineExceeded)


@dataclass(frozen=True)
class Delivery:
    """One message as a handler sees it."""

    body: bytes
    queue: str
    deliveries: int
    """How many times RabbitMQ has delivered it, this time included."""
    dead_letter_queue: str = ""
    """For dead-lettered messages: the queue it died in."""


Handler = Callable[[Delivery], Awaitable[None]]


class _PriorityGate:
    """At most `slots` holders at once; waiters are let in lowest level first, then in order."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @contextlib.asynccontextmanager
    async def slot(self, level: int) -> Any:
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            future = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (level, next(self._order), future))
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._release()  # it was handed the slot just as it was cancelled
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            _, _, future = heapq.heappop(self._waiting)
            if not future.done():
                future.set_result(None)
                return
        self._free += 1


class Consumer:
    """Consumes a set of queues (one stage's levels, or the dead-letter queue) into a handler.
    A Resource: `start()` subscribes once the broker is connected (and keeps trying, logging
    each failure at ERROR, until it can); `stop()` stops taking messages, waits up to `grace_s`
    for those in hand, and requeues the rest."""

    def __init__(
        self,
        broker: Broker,
        queues: Sequence[str],
        handler: Handler,
        stage: str,
        prefetch: int = 4,
        concurrency: int = 2,
        grace_s: float = 10.0,
        transient_hold_s: float = 30.0,
    ) -> None:
        self.broker = broker
        self.queues = list(queues)
        self.handler = handler
        self.stage = stage
        self.prefetch = prefetch
        self.grace_s = grace_s
        self.transient_hold_s = transient_hold_s
        self._gate = _PriorityGate(concurrency)
        self._stopping = False
        self._stopped = asyncio.Event()  # wakes handlers pausing between retries
        self._channel: AbstractRobustChannel | None = None
        self._subscribed: list[tuple[AbstractQueue, str]] = []
        self._in_hand: set[asyncio.Task[Any]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._tag = {"stage": stage}
        declare_stage(stage)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._subscribe_until_done()),
            loop.create_task(self._watch_depth()),
        ]

    async def _subscribe_until_done(self) -> None:
        """A consumer that gave up in silence would leave its service SERVING while it consumes
        nothing: every failure is logged at ERROR and subscribing is tried again, backing off."""
        pause = RECONNECT_INTERVAL_S
        while True:
            try:
                await self._subscribe()
                return
            except Exception as exc:
                log.error(
                    "cannot consume %s (%s); retrying in %.0f s",
                    ", ".join(self.queues),
                    exc.__cause__ or exc,
                    pause,
                    extra=self._tag,
                    exc_info=not isinstance(exc, Unavailable),  # a bug: show where
                )
            await self._cancel_consumers()
            await self._close_channel()
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_RECONNECT_INTERVAL_S)

    async def _subscribe(self) -> None:
        connection = await self.broker.connection()
        with translated(self.broker.address, f"consuming {self.stage}"):
            channel = await connection.channel()
            self._channel = channel  # type: ignore[assignment]
            await channel.set_qos(prefetch_count=self.prefetch)
            for level, name in enumerate(self.queues):
                queue = await channel.get_queue(name, ensure=True)
                tag = await queue.consume(self._callback(level), no_ack=False)
                self._subscribed.append((queue, tag))
        log.info("consuming", extra={**self._tag, "queues": self.queues})

    def _callback(self, level: int) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def on_message(message: AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._in_hand.add(task)
            try:
                await self._take(message, level)
            finally:
                self._in_hand.discard(task)

        return on_message

    async def _take(self, message: AbstractIncomingMessage, level: int) -> None:
        if self._stopping:
            await self._settle(message, requeue=True)
            return
        delivery = to_delivery(message)
        started = time.perf_counter()
        CONSUMED.labels(self.stage).inc()
        if delivery.deliveries > 1:
            REDELIVERED.labels(self.stage).inc()
        with tracing.server_span(f"{self.stage}/consume", _trace_headers(message)) as span:
            span.set_attribute("messaging.delivery_count", delivery.deliveries)
            outcome = await self._run(delivery, level)
        if outcome == "requeue" and delivery.deliveries >= self.broker.topology.max_deliveries:
            DEAD_LETTERED.labels(self.stage).inc()
        await self._settle(message, requeue=True if outcome != "ack" else None)
        OUTCOMES.labels(self.stage, outcome).inc()
        HANDLE_DURATION.labels(self.stage).observe(time.perf_counter() - started)

    async def _run(self, delivery: Delivery, level: int) -> str:
        """ "ack" when handled; "requeue" when it failed, when transient errors outlasted
        `transient_hold_s`, or when the service is stopping."""
        held_since = time.monotonic()
        pause = RETRY_PAUSE_S
        while True:
            result = await self._attempt(delivery, level)
            if isinstance(result, str):
                return result
            held_s = time.monotonic() - held_since
            if held_s + pause > self.transient_hold_s:
                log.error(
                    "a message met transient errors for %.0f s (last: %s); it goes back to its "
                    "queue, spending a delivery",
                    held_s,
                    result.message,
                    extra=self._tag,
                )
                return "requeue"
            await self._pause(pause, result)
            pause = min(pause * 2, MAX_RETRY_PAUSE_S)

    async def _pause(self, seconds: float, error: FmserveError) -> None:
        OUTCOMES.labels(self.stage, "retry").inc()
        log.warning("retrying a message in %.1f s: %s", seconds, error.message, extra=self._tag)
        with contextlib.suppress(TimeoutError):  # stop() ends the pause early
            await asyncio.wait_for(self._stopped.wait(), seconds)

    async def _attempt(self, delivery: Delivery, level: int) -> str | FmserveError:
        """One call of the handler in a concurrency slot: "ack", "requeue", or the transient
        error to retry after a pause (the slot is free meanwhile, so a held message never
        keeps the stage's other messages waiting)."""
        async with self._gate.slot(level):
            if self._stopping:
                return "requeue"
            try:
                await self.handler(delivery)
                return "ack"
            except TRANSIENT as exc:
                return exc
            except Exception:
                log.exception("a message failed; it goes back to its queue", extra=self._tag)
                return "requeue"

    async def _settle(self, message: AbstractIncomingMessage, requeue: bool | None) -> None:
        """Ack (requeue None) or nack. On a channel that has since closed this fails, and
        RabbitMQ redelivers the message anyway: a duplicate, which recording absorbs."""
        try:
            if requeue is None:
                await message.ack()
            else:
                await message.nack(requeue=requeue)
        except (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError) as exc:
            log.info("could not settle a message (%s); it will be redelivered", exc)

    async def _watch_depth(self) -> None:
        connection = await self.broker.connection()
        while True:
            with contextlib.suppress(Exception):  # a gauge must never take the consumer down
                DEPTH.labels(self.stage).set(await queue_depth(connection, self.queues))
            await asyncio.sleep(DEPTH_EVERY_S)

    async def stop(self) -> None:
        """Stop taking messages, let those in hand finish within the grace (a handler pausing
        between retries gives its message back at once), requeue the rest, close."""
        self._stopping = True
        self._stopped.set()
        await self._cancel_consumers()
        if self._in_hand:
            await asyncio.wait(list(self._in_hand), timeout=self.grace_s)
        for task in [*self._tasks, *self._in_hand]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._in_hand, return_exceptions=True)
        await self._close_channel()

    async def _cancel_consumers(self) -> None:
        for queue, tag in self._subscribed:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        self._subscribed.clear()

    async def _close_channel(self) -> None:
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close()
            self._channel = None


def _trace_headers(message: AbstractIncomingMessage) -> dict[str, str]:
    return {
        k: str(v) for k, v in (message.headers or {}).items() if k in ("traceparent", "tracestate")
    }


def to_delivery(message: AbstractIncomingMessage) -> Delivery:
    headers = message.headers or {}
    # Quorum queues count earlier deliveries in x-delivery-count (absent on the first one).
    count = int(str(headers.get("x-delivery-count") or 0)) + 1
    deaths = headers.get("x-death") or []
    origin = ""
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        origin = str(deaths[0].get("queue", ""))
    return Delivery(message.body, message.routing_key or "", count, origin)
