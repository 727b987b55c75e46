"""The AMQP connection and publishing (aio-pika): every broker failure leaves as
fmserve.errors.Unavailable, naming host and port, never the URL.

Publishing goes to the default exchange with the queue's name as routing key, persistent,
mandatory on a channel opened with on_return_raises (an unroutable message raises), with
publisher confirms under a timeout. Many messages are published at once and their confirms
gathered as they arrive, never awaited one by one.

Failures a person must fix (a queue declared before with other arguments) are logged at ERROR,
saying what to do, and retried: a service never sits SERVING while consuming nothing in silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection, TimeoutType

from fmserve.core import tracing
from fmserve.errors import Unavailable
from fmserve.queue.metrics import PUBLISHED
from fmserve.queue.topology import Topology, declare

log = logging.getLogger("fmserve.queue")

# Reconnection: how often a service that never reached RabbitMQ tries again; the robust
# connection then handles later drops on its own, at the same interval.
RECONNECT_INTERVAL_S = 1.0
# Retries of what a person must fix (arguments that differ, a missing queue) back off to this.
MAX_RECONNECT_INTERVAL_S = 30.0
RETRY_PAUSE_S = 0.5


def amqp_address(url: str) -> str:
    """Where an AMQP URL points, without user or password: `host:port`."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5672}"


@contextlib.contextmanager
def translated(address: str, doing: str) -> Iterator[None]:
    """Turn aio-pika/aiormq failures into Unavailable. Its message can reach a client (the
    gateway's SubmitJob), so it names no host, queue or library: the log line says which."""
    try:
        yield
    except aiormq.exceptions.PublishError as exc:
        _log_failure(address, doing, exc)
        raise Unavailable("the job queue refused a message") from exc
    except (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError) as exc:
        _log_failure(address, doing, exc)
        raise Unavailable("the job queue is unavailable") from exc
    except TimeoutError as exc:
        _log_failure(address, doing, exc)
        raise Unavailable("the job queue did not confirm in time") from exc


def _log_failure(address: str, doing: str, exc: BaseException) -> None:
    log.warning("RabbitMQ failed while %s: %r", doing, exc, extra={"amqp": address})


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
            connection_class=_ClosedIfRefused,
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
            log.debug("RabbitMQ is not connected yet", extra=self._where())
            raise Unavailable("the job queue is not connected yet")
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

    async def ready_messages(self, stage: str) -> int:
        """Messages waiting in a stage's queues (every level); Unavailable when RabbitMQ is
        not connected or does not answer."""
        if not self._ready.is_set() or self._connection is None:
            raise Unavailable("the job queue is not connected yet")
        with translated(self.address, f"reading the depth of {stage}"):
            return await queue_depth(self._connection, self.topology.queues(stage))

    def _where(self) -> dict[str, str]:
        return {"amqp": self.address}


async def queue_depth(connection: AbstractRobustConnection, queues: Sequence[str]) -> int:
    """Messages ready in the queues, by passive declaration on a short-lived channel."""
    total = 0
    async with connection.channel() as channel:
        for name in queues:
            queue = await channel.declare_queue(name, passive=True)
            total += queue.declaration_result.message_count or 0
    return total


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


class _ClosedIfRefused(aio_pika.RobustConnection):
    """connect_robust drops a connection whose first connect failed without closing it; the
    garbage collector, meeting it later outside an event loop, then creates a close() that
    nobody awaits (a RuntimeWarning in whatever runs then). Closed at once instead."""

    async def connect(self, timeout: TimeoutType = None) -> None:
        try:
            await super().connect(timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.close()
            raise
