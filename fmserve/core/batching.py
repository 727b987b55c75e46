"""Dynamic batching: items submitted concurrently are grouped into one call of a batch handler.

The contract (tests/unit/test_batching.py holds it):
- A lone item on an idle batcher runs at once unless `max_queue_delay_s` asks to wait for
  company; the next batch forms from whatever queued while `max_in_flight` batches were running.
- A batch holds at most `max_batch_size` items and `max_batch_cost` cost (e.g. tokens); one item
  costlier than the limit still runs, alone.
- Higher priority first: priority 0 (interactive) is always taken before 1 (background).
- Background work is kept short, because a running batch cannot be interrupted: the background
  items of one batch cost at most `max_background_cost` in all (one costlier item still runs,
  alone), which bounds how long an interactive item arriving meanwhile waits for its turn; and a
  batch that carries interactive items takes background ones only up to `background_batch_size`
  items in all, so the interactive items in it never wait long behind background work.
- Every waiter is answered exactly once on every path: its result, its own error (the handler
  returns an exception in its slot), the batch's error (the handler raised), or Unavailable on
  stop. Waiters cancelled while queued are dropped before compute.
- When `max_queue_size` items already wait, `submit` refuses at once with Overloaded.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from fmserve.errors import FmserveError, Overloaded, Unavailable

I = TypeVar("I")  # noqa: E741 - conventional name for the item type
R = TypeVar("R")

# The handler gets a batch of items and returns one result, or one exception, per item.
BatchHandler = Callable[[list[I]], Awaitable[Sequence[R | BaseException]]]
# Told each batch's size and its items' queueing delays, for metrics.
BatchObserver = Callable[[int, list[float]], None]


@dataclass
class _Waiter(Generic[I, R]):
    item: I
    cost: int
    future: asyncio.Future[R]
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class BatchLimits:
    max_batch_size: int = 32
    max_batch_cost: int | None = None
    max_queue_delay_s: float = 0.0
    max_in_flight: int = 1
    max_queue_size: int = 10_000
    background_batch_size: int = 4
    """Most items in all of a batch that carries interactive items and takes background ones."""
    max_background_cost: int | None = None
    """Most cost of the background items in any one batch; None: only the batch limits."""


class Batcher(Generic[I, R]):
    """Owns its queues, its in-flight batches and every waiter's future."""

    PRIORITIES = (0, 1)

    def __init__(
        self,
        handler: BatchHandler[I, R],
        limits: BatchLimits | None = None,
        cost: Callable[[I], int] = lambda _: 1,
        observer: BatchObserver | None = None,
    ) -> None:
        self._handler = handler
        self.limits = limits or BatchLimits()
        self._cost = cost
        self._observer = observer
        self._queues: dict[int, deque[_Waiter[I, R]]] = {p: deque() for p in self.PRIORITIES}
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = False

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def submit(self, item: I, priority: int = 0) -> R:
        """Queue one item and wait for its result; raises its error."""
        self._admit(1)
        waiter = _Waiter(item, self._cost(item), asyncio.get_running_loop().create_future())
        self._queues[1 if priority else 0].append(waiter)
        self._dispatch()
        return await waiter.future

    async def submit_many(self, items: Sequence[I], priority: int = 0) -> list[R]:
        """Queue several items at once (one request's parts) and wait for all their results, in
        order; raises the first error. When one fails or the caller gives up, the others still
        queued are dropped before compute."""
        futures = self.enqueue(items, priority)
        try:
            return list(await asyncio.gather(*futures))
        finally:
            _abandon(futures)

    def enqueue(self, items: Sequence[I], priority: int = 0) -> list[asyncio.Future[R]]:
        """Queue several items at once and return their futures, in order, without waiting.
        Queued together they can share a batch, where one by one the first would start alone
        on an idle batcher. Cancelling a future drops its item if it is still queued."""
        self._admit(len(items))
        loop = asyncio.get_running_loop()
        waiters = [_Waiter(item, self._cost(item), loop.create_future()) for item in items]
        self._queues[1 if priority else 0].extend(waiters)
        self._dispatch()
        return [w.future for w in waiters]

    def _admit(self, count: int) -> None:
        if self._stopped:
            raise Unavailable("the service is shutting down; retry on another replica")
        if self.queued + count > self.limits.max_queue_size:
            self._drop_cancelled()  # callers that gave up hold no place in the queue
        if self.queued + count > self.limits.max_queue_size:
            raise Overloaded(f"{self.queued} items already queued; retry shortly")

    async def stop(self) -> None:
        """Refuse new items, fail those still queued with Unavailable, let running batches end."""
        self._stopped = True
        if self._timer:
            self._timer.cancel()
        for queue in self._queues.values():
            while queue:
                _settle(queue.popleft().future, Unavailable("the service is shutting down"))
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _dispatch(self) -> None:
        while self.in_flight < self.limits.max_in_flight:
            self._drop_cancelled()
            if not self.queued or self._should_wait():
                return
            batch = self._take_batch()
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._finished)

    def _should_wait(self) -> bool:
        """With a queue delay set, an idle batcher waits for company until the oldest item's
        delay is spent or the batch is full."""
        delay = self.limits.max_queue_delay_s
        if delay <= 0 or self.in_flight or self._batch_full():
            return False
        oldest = min(q[0].enqueued for q in self._queues.values() if q)
        left = oldest + delay - time.monotonic()
        if left <= 0:
            return False
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(left, self._timer_fired)
        return True

    def _batch_full(self) -> bool:
        limits = self.limits
        if self.queued >= limits.max_batch_size:
            return True
        if _reached(sum(w.cost for q in self._queues.values() for w in q), limits.max_batch_cost):
            return True
        # Background items alone that already fill their budget: waiting would add none.
        background = sum(w.cost for w in self._queues[1])
        return not self._queues[0] and _reached(background, limits.max_background_cost)

    def _timer_fired(self) -> None:
        self._timer = None
        self._dispatch()

    def _drop_cancelled(self) -> None:
        for priority, queue in self._queues.items():
            if any(w.future.done() for w in queue):
                self._queues[priority] = deque(w for w in queue if not w.future.done())

    def _take_batch(self) -> list[_Waiter[I, R]]:
        batch: list[_Waiter[I, R]] = []
        cost = 0
        for priority in self.PRIORITIES:
            queue, spent = self._queues[priority], 0
            size, budget = self._room(priority, bool(batch))
            while queue and len(batch) < size:
                nxt = queue[0]
                if batch and (
                    _passed(cost + nxt.cost, self.limits.max_batch_cost)
                    or _passed(spent + nxt.cost, budget)
                ):
                    return batch
                batch.append(queue.popleft())
                cost += nxt.cost
                spent += nxt.cost
        return batch

    def _room(self, priority: int, interactive: bool) -> tuple[int, int | None]:
        """The most items a batch may hold once this priority's items join it, and the most cost
        those may add (the batch's own cost limit applies too)."""
        limits = self.limits
        if not priority:
            return limits.max_batch_size, None
        size = limits.max_batch_size
        if interactive:  # interactive items ride along: keep their batch small
            size = min(size, limits.background_batch_size)
        return size, limits.max_background_cost

    async def _run(self, batch: list[_Waiter[I, R]]) -> None:
        now = time.monotonic()
        try:  # the observer too: whatever fails, every waiter must hear of it
            if self._observer:
                self._observer(len(batch), [now - w.enqueued for w in batch])
            results = await self._handler([w.item for w in batch])
            if len(results) != len(batch):
                raise FmserveError(
                    f"batch handler returned {len(results)} results for {len(batch)} items"
                )
        except BaseException as exc:  # every waiter hears of it, even on cancellation
            for waiter in batch:
                _settle(waiter.future, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for waiter, result in zip(batch, results, strict=True):
            _settle(waiter.future, result)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._stopped:
            self._dispatch()


def _passed(cost: int, limit: int | None) -> bool:
    """Whether `cost` goes past `limit` (None or 0: no limit)."""
    return limit is not None and 0 < limit < cost


def _reached(cost: int, limit: int | None) -> bool:
    return limit is not None and 0 < limit <= cost


def _abandon(futures: list[asyncio.Future[R]]) -> None:
    """Cancel the futures still pending (their items are dropped before compute) and mark the
    failed ones' errors as seen: asyncio logs every exception nobody retrieved."""
    for future in futures:
        if not future.done():
            future.cancel()
        elif not future.cancelled():
            future.exception()


def _settle(future: asyncio.Future[R], outcome: R | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, asyncio.CancelledError):
        future.set_exception(Unavailable("the batch was cancelled; retry"))
    elif isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
