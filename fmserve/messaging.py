"""The AMQP adapter (aio-pika): the one module that sees RabbitMQ, its client and its exceptions.
Every broker failure leaves as fmserve.errors.Unavailable, naming host and port, never the URL.

Topology, declared idempotently by every service at start (names under FMSERVE_AMQP_QUEUE_PREFIX):

    {prefix}{stage}.{level}   quorum queue per stage (preprocess, inference, postprocess) and
                              priority level (high, normal, low): x-delivery-limit, dead-letters
                              to {prefix}dead-letter (at-least-once, so reject-publish overflow)
    {prefix}dead-letter       fanout exchange and quorum queue of messages that failed too often

Why a queue per priority level: quorum queues (the durable, replicated kind that counts
deliveries and dead-letters poison messages) have no message priorities; classic queues do, but
lose those safety properties. A consumer takes the levels' messages into one local scheduler
that always runs the highest waiting level first (`Consumer`).

Publishing goes to the default exchange with the queue's name as routing key, persistent,
mandatory on a channel opened with on_return_raises (an unroutable message raises), with
publisher confirms under a timeout. Many messages are published at once and their confirms
gathered as they arrive, never awaited one by one.

Consuming uses manual acks and a bounded prefetch per queue. `Consumer` owns ack/nack, retries,
redelivery counts and metrics; a handler only does the work:
    - returns             → ack
    - raises TRANSIENT    → (Unavailable, Overloaded, DeadlineExceeded: a store or broker hiccup,
                            a model not ready, a full batcher) the message stays unacked and the
                            handler is retried with backoff, spending no delivery; the concurrency
                            slot is given up during each pause. The hold is bounded
                            (`transient_hold_s`): an error that does not pass (a model whose files
                            are broken raises Unavailable every time) then counts like any other
    - raises other        → nack with requeue: one delivery spent

Delivery limit: a quorum queue's x-delivery-limit N counts *re*deliveries, so RabbitMQ delivers a
message N + 1 times (`Topology.max_deliveries`) and dead-letters it when the last one fails.

Failures a person must fix (a queue declared before with other arguments, a queue that is
missing) are logged at ERROR, saying what to do, and retried: a service never sits SERVING
while consuming nothing in silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from prometheus_client import Counter, Gauge, Histogram

from fmserve import tracing
from fmserve.errors import DeadlineExceeded, FmserveError, Overloaded, Unavailable
from fmserve.metrics import LATENCY_BUCKETS

log = logging.getLogger("fmserve.messaging")

STAGES = ("preprocess", "inference", "postprocess")
LEVELS = ("high", "normal", "low")
"""Priority levels, highest first (the order a consumer drains them)."""

# Reconnection: how often a service that never reached RabbitMQ tries again; the robust
# connection then handles later drops on its own, at the same interval.
RECONNECT_INTERVAL_S = 1.0
# Retries of what a person must fix (arguments that differ, a missing queue) back off to this.
MAX_RECONNECT_INTERVAL_S = 30.0
RETRY_PAUSE_S = 0.5
MAX_RETRY_PAUSE_S = 5.0
DEPTH_EVERY_S = 5.0

# Errors that say nothing about the message itself: the consumer holds the message and retries
# it without spending a delivery (see the module docstring). Defined here, the lower layer, so
# that fmserve.jobs and the consumer agree by construction.
TRANSIENT: tuple[type[FmserveError], ...] = (Unavailable, Overloaded, DeadlineExceeded)

CONSUMED = Counter(
    "fmserve_queue_messages_consumed_total", "Messages taken from a queue, by stage.", ["stage"]
)
PUBLISHED = Counter(
    "fmserve_queue_messages_published_total",
    "Messages published and confirmed, by destination stage.",
    ["stage"],
)
REDELIVERED = Counter(
    "fmserve_queue_messages_redelivered_total",
    "Messages delivered again after a crash, a dropped connection or a failure, by stage.",
    ["stage"],
)
DEAD_LETTERED = Counter(
    "fmserve_queue_messages_dead_lettered_total",
    "Messages that failed on their last delivery (delivery limit + 1: RabbitMQ dead-letters "
    "them), by stage.",
    ["stage"],
)
OUTCOMES = Counter(
    "fmserve_queue_messages_handled_total",
    "Handled messages by stage and outcome (ack, retry, requeue).",
    ["stage", "outcome"],
)
HANDLE_DURATION = Histogram(
    "fmserve_queue_handle_duration_seconds",
    "Time from taking a message to acking it, by stage.",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
DEPTH = Gauge(
    "fmserve_queue_depth_messages",
    "Messages ready in a stage's queues (all priority levels), by stage.",
    ["stage"],
)


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


def amqp_address(url: str) -> str:
    """Where an AMQP URL points, without user or password: `host:port`."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5672}"


@contextlib.contextmanager
def translated(address: str, doing: str) -> Iterator[None]:
    """Turn aio-pika/aiormq failures into Unavailable, saying what failed and where."""
    try:
        yield
    except aiormq.exceptions.PublishError as exc:
        raise Unavailable(f"RabbitMQ at {address} could not route a message ({doing})") from exc
    except (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError) as exc:
        raise Unavailable(
            f"RabbitMQ at {address} is unavailable ({doing}: {type(exc).__name__}); "
            "it is retried once RabbitMQ is back"
        ) from exc
    except TimeoutError as exc:
        raise Unavailable(f"RabbitMQ at {address} did not confirm in time ({doing})") from exc


class Broker:
    """Owns the connection, the topology and the publishing channel. A Resource: `start()`
    returns once connected (or after `connect_wait_s`, connecting on in the background)."""

    def __init__(
        self, url: str, topology: Topology, publish_timeout_s: float = 10.0, name: str = ""
    ) -> None:
        self.url = url
        self.address = amqp_address(url)
        self.topology = topology
        self.publish_timeout_s = publish_timeout_s
        self.name = name
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, connect_wait_s: float = 5.0) -> None:
        self._task = asyncio.get_running_loop().create_task(self._connect_until_done())
        try:
            await asyncio.wait_for(asyncio.shield(self._ready.wait()), connect_wait_s)
        except TimeoutError:
            log.warning("RabbitMQ unreachable; connecting in the background", extra=self._where())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._connection is not None:
            with contextlib.suppress(Exception):  # closing a dead connection may fail: no matter
                await self._connection.close()
        self._connection = self._channel = None
        self._ready.clear()

    async def connection(self) -> AbstractRobustConnection:
        """The connection, once there is one (waits for it)."""
        await self._ready.wait()
        assert self._connection is not None
        return self._connection

    async def _connect_until_done(self) -> None:
        pause = RECONNECT_INTERVAL_S
        while True:
            try:
                await self._connect()
                return
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                # Not transient: only a person can fix it. Said loudly, retried slowly.
                self._refused(exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, MAX_RECONNECT_INTERVAL_S)
            except (aiormq.exceptions.AMQPError, ConnectionError, OSError) as exc:
                log.debug("RabbitMQ connect failed: %s", exc, extra=self._where())
                await asyncio.sleep(RECONNECT_INTERVAL_S)

    def _refused(self, exc: Exception, retry_in_s: float) -> None:
        """What a mismatched FMSERVE_AMQP_DELIVERY_LIMIT (or prefix reuse) produces; RabbitMQ's
        reply names the queue and the argument."""
        log.error(
            "RabbitMQ refused to declare the queues (%s): a queue of that name exists with other "
            "arguments. Delete it (`rabbitmqctl delete_queue NAME`, which drops its messages) or "
            "use the same FMSERVE_AMQP_DELIVERY_LIMIT it was declared with (x-delivery-limit); "
            "retrying in %.0f s",
            exc,
            retry_in_s,
            extra=self._where(),
        )

    async def _connect(self) -> None:
        connection = await aio_pika.connect_robust(
            self.url,
            reconnect_interval=RECONNECT_INTERVAL_S,
            client_properties={"connection_name": f"fmserve-{self.name}"},
        )
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            await declare(channel, self.topology)
        except BaseException:
            # Each attempt opens a connection: one that failed half-way must not linger.
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        self._connection, self._channel = connection, channel  # type: ignore[assignment]
        self._ready.set()
        log.info("connected to RabbitMQ", extra=self._where())

    async def publish(self, stage: str, level: str, bodies: Sequence[bytes]) -> None:
        """Publish persistent messages to a stage's queue at a level; returns once RabbitMQ has
        confirmed all of them. Retries while the connection recovers, up to the timeout
        (a message published twice is harmless: recording an item is idempotent)."""
        if not bodies:
            return
        deadline = time.monotonic() + self.publish_timeout_s
        queue = self.topology.queue(stage, level)
        while True:
            try:
                await self._publish_once(queue, bodies, deadline)
                PUBLISHED.labels(stage).inc(len(bodies))
                return
            except Unavailable:
                if time.monotonic() + RETRY_PAUSE_S >= deadline:
                    raise
                await asyncio.sleep(RETRY_PAUSE_S)

    async def _publish_once(self, queue: str, bodies: Sequence[bytes], deadline: float) -> None:
        left = max(0.01, deadline - time.monotonic())
        if not self._ready.is_set() or self._channel is None:
            raise Unavailable(f"RabbitMQ at {self.address} is not connected yet; retry shortly")
        exchange = self._channel.default_exchange
        with translated(self.address, f"publishing to {queue}"):
            sends = [
                exchange.publish(_message(body), queue, mandatory=True, timeout=left)
                for body in bodies
            ]
            # Every confirm awaited together: one slow one holds none of the others.
            results = await asyncio.gather(*sends, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    def _where(self) -> dict[str, str]:
        return {"amqp": self.address}


def _trace_context() -> aio_pika.abc.HeadersType:
    return {**tracing.inject()}


def _message(body: bytes) -> aio_pika.Message:
    """A persistent message carrying the publisher's trace, so the consumer's span continues it."""
    return aio_pika.Message(
        body,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        content_type="application/x-protobuf",
        headers=_trace_context(),
    )


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


async def queue_depth(connection: AbstractRobustConnection, queues: Sequence[str]) -> int:
    """Messages ready in the queues, by passive declaration on a short-lived channel."""
    total = 0
    async with connection.channel() as channel:
        for name in queues:
            queue = await channel.declare_queue(name, passive=True)
            total += queue.declaration_result.message_count or 0
    return total


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
