"""The Batcher's contract, point by point (see the docstring of fmserve/core/batching.py).

Handler timing is held by asyncio events, not sleeps: a `GatedHandler` batch runs until the test
opens its gate, so "items queued while a batch runs" is a state the test sets up exactly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from fmserve.core.batching import Batcher, BatchLimits
from fmserve.errors import FmserveError, InvalidInput, Overloaded, Unavailable

pytestmark = pytest.mark.timeout(10)


class GatedHandler:
    """Records every batch it gets; batches finish only once `open()` is called."""

    def __init__(self, *, gated: bool = True) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.running = 0
        self.most_running = 0
        if not gated:
            self.gate.set()

    async def __call__(self, items: list[int]) -> Sequence[int | BaseException]:
        self.batches.append(list(items))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        self.started.set()
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        return [item * 10 for item in items]

    def open(self) -> None:
        self.gate.set()

    async def wait_for_batches(self, count: int) -> None:
        while len(self.batches) < count:
            self.started.clear()
            await self.started.wait()


async def settle() -> None:
    """Let every ready task run until the loop has nothing left to do at once."""
    for _ in range(10):
        await asyncio.sleep(0)


def submit_all(batcher: Batcher[int, int], items: list[int], priority: int = 0) -> list:
    return [asyncio.create_task(batcher.submit(i, priority)) for i in items]


async def busy(batcher: Batcher[int, int], handler: GatedHandler, item: int = 0) -> asyncio.Task:
    """Start a first batch holding `item` and return once the handler holds it."""
    task = asyncio.create_task(batcher.submit(item))
    await handler.wait_for_batches(1)
    return task


# --- a lone item, and the next batch ---------------------------------------------------------


async def test_lone_item_on_idle_batcher_runs_at_once() -> None:
    handler = GatedHandler()
    batcher = Batcher(handler, BatchLimits(max_queue_delay_s=0))
    task = asyncio.create_task(batcher.submit(7))
    await asyncio.sleep(0)  # one turn of the loop: submit ran, no timer stands in between
    assert batcher.in_flight == 1
    assert batcher.queued == 0
    handler.open()
    assert await task == 70
    assert handler.batches == [[7]]


async def test_items_queued_while_a_batch_runs_form_the_next_batch() -> None:
    handler = GatedHandler()
    sizes: list[int] = []
    batcher = Batcher(handler, observer=lambda size, _delays: sizes.append(size))
    first = await busy(batcher, handler, 1)
    rest = submit_all(batcher, [2, 3, 4])
    await settle()
    assert batcher.queued == 3
    handler.open()
    assert await asyncio.gather(first, *rest) == [10, 20, 30, 40]
    assert handler.batches == [[1], [2, 3, 4]]
    assert sizes == [1, 3]


async def test_observer_is_told_queueing_delays() -> None:
    seen: list[list[float]] = []
    batcher = Batcher(GatedHandler(gated=False), observer=lambda _size, d: seen.append(d))
    await asyncio.gather(*submit_all(batcher, [1, 2]))
    assert all(delay >= 0 for delays in seen for delay in delays)
    assert sum(len(delays) for delays in seen) == 2


# --- limits: items and cost ------------------------------------------------------------------


async def test_max_batch_size_is_respected() -> None:
    handler = GatedHandler()
    batcher = Batcher(handler, BatchLimits(max_batch_size=3))
    first = await busy(batcher, handler)
    rest = submit_all(batcher, list(range(1, 8)))
    await settle()
    handler.open()
    await asyncio.gather(first, *rest)
    assert handler.batches == [[0], [1, 2, 3], [4, 5, 6], [7]]


async def test_max_batch_cost_is_respected_and_a_costly_item_runs_alone() -> None:
    handler = GatedHandler()
    batcher = Batcher(handler, BatchLimits(max_batch_cost=10), cost=lambda item: item)
    first = await busy(batcher, handler)
    rest = submit_all(batcher, [4, 5, 2, 25, 3, 3])
    await settle()
    handler.open()
    assert await asyncio.gather(*rest) == [40, 50, 20, 250, 30, 30]
    await first
    # 4+5 fit, +2 would pass 10; 2 alone, 25 is over the limit on its own; 3+3.
    assert handler.batches == [[0], [4, 5], [2], [25], [3, 3]]


async def test_item_costlier_than_the_limit_runs_alone_without_waiting() -> None:
    handler = GatedHandler(gated=False)
    limits = BatchLimits(max_batch_cost=10, max_queue_delay_s=5.0)
    batcher = Batcher(handler, limits, cost=lambda item: item)
    # With a long delay, only "the batch is full" (in cost) may start it this early.
    assert await asyncio.wait_for(batcher.submit(50), timeout=1.0) == 500
    assert handler.batches == [[50]]


# --- max_queue_delay_s -----------------------------------------------------------------------


async def test_lone_item_waits_for_the_queue_delay_and_not_much_longer() -> None:
    handler = GatedHandler(gated=False)
    batcher = Batcher(handler, BatchLimits(max_queue_delay_s=0.1))
    task = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    assert (batcher.in_flight, batcher.queued) == (0, 1)  # waiting for company
    started = time.monotonic()
    assert await task == 10
    waited = time.monotonic() - started
    assert 0.08 <= waited < 0.35


async def test_items_arriving_within_the_delay_join_the_batch() -> None:
    handler = GatedHandler(gated=False)
    batcher = Batcher(handler, BatchLimits(max_queue_delay_s=0.1))
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0.02)
    second = asyncio.create_task(batcher.submit(2))
    assert await asyncio.gather(first, second) == [10, 20]
    assert handler.batches == [[1, 2]]


async def test_a_full_batch_does_not_wait_for_the_delay() -> None:
    handler = GatedHandler(gated=False)
    batcher = Batcher(handler, BatchLimits(max_batch_size=2, max_queue_delay_s=5.0))
    results = await asyncio.wait_for(asyncio.gather(*submit_all(batcher, [1, 2])), timeout=1.0)
    assert results == [10, 20]
    assert handler.batches == [[1, 2]]


# --- answers: order, per-item errors, batch errors -------------------------------------------


async def test_results_reach_the_right_waiters_in_order() -> None:
    async def label(items: list[int]) -> list[str]:
        return [f"item-{item}" for item in items]

    batcher: Batcher[int, str] = Batcher(label, BatchLimits(max_batch_size=4))
    items = [5, 3, 9, 1, 7, 2, 8, 4, 6]
    results = await asyncio.gather(*[batcher.submit(i) for i in items])
    assert results == [f"item-{i}" for i in items]


async def test_an_exception_in_one_slot_fails_only_that_waiter() -> None:
    async def handler(items: list[int]) -> list[int | BaseException]:
        return [InvalidInput(f"item {i} is bad") if i == 2 else i for i in items]

    batcher = Batcher(handler)
    outcomes = await asyncio.gather(*submit_all(batcher, [1, 2, 3]), return_exceptions=True)
    assert outcomes[0] == 1
    assert outcomes[2] == 3
    assert isinstance(outcomes[1], InvalidInput)
    assert "item 2" in str(outcomes[1])


async def test_a_raising_handler_fails_its_whole_batch_and_the_batcher_goes_on() -> None:
    failing = True

    async def handler(items: list[int]) -> list[int]:
        if failing:
            raise RuntimeError("the model fell over")
        return items

    batcher = Batcher(handler)
    outcomes = await asyncio.gather(*submit_all(batcher, [1, 2, 3]), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    failing = False
    assert await batcher.submit(4) == 4


async def test_wrong_result_count_fails_every_waiter() -> None:
    async def handler(items: list[int]) -> list[int]:
        return items[:-1]

    batcher = Batcher(handler)
    outcomes = await asyncio.gather(*submit_all(batcher, [1, 2, 3]), return_exceptions=True)
    assert all(isinstance(o, FmserveError) for o in outcomes)
    # The lone first item ran alone; the two queued behind it formed the next batch.
    assert "0 results for 1 items" in str(outcomes[0])
    assert "1 results for 2 items" in str(outcomes[2])


async def test_a_cancelled_batch_answers_its_waiters_with_unavailable() -> None:
    cancelling = True

    async def handler(items: list[int]) -> list[int]:
        if cancelling:
            raise asyncio.CancelledError
        return items

    batcher = Batcher(handler)
    outcomes = await asyncio.gather(*submit_all(batcher, [1, 2]), return_exceptions=True)
    assert all(isinstance(o, Unavailable) for o in outcomes)
    cancelling = False
    assert await batcher.submit(3) == 3


async def test_a_failing_observer_still_answers_every_waiter() -> None:
    failures = [RuntimeError("metrics are down")]

    def observer(_size: int, _delays: list[float]) -> None:
        if failures:
            raise failures.pop()

    batcher = Batcher(GatedHandler(gated=False), observer=observer)
    outcome = await asyncio.wait_for(
        asyncio.gather(batcher.submit(1), return_exceptions=True), timeout=1.0
    )
    assert isinstance(outcome[0], RuntimeError)
    assert await batcher.submit(2) == 20


# --- cancellation, overload, stop ------------------------------------------------------------


async def test_waiters_cancelled_while_queued_are_dropped_before_compute() -> None:
    handler = GatedHandler()
    batcher = Batcher(handler)
    first = await busy(batcher, handler, 1)
    two, three, four = submit_all(batcher, [2, 3, 4])
    await settle()
    two.cancel()
    four.cancel()
    await settle()
    handler.open()
    assert await three == 30
    await first
    assert handler.batches == [[1], [3]]
    assert two.cancelled() and four.cancelled()


async def test_a_full_queue_refuses_at_once_with_overloaded() -> None:
    handler = GatedHandler()
    batcher = Batcher(handler, BatchLimits(max_queue_size=2))
    first = await busy(batcher, handler)
    queued = submit_all(batcher, [1, 2])
    await settle()
    with pytest.raises(Overloaded):
        await batcher.submit(3)  # raises in its first step: no waiting for the gate
    handler.open()
    assert await asyncio.gather(*queued) == [10, 20]
    await first


async def test_cancelled_waiters_hold_no_place_in_a_full_queue() -> None:
    handler = GatedHandler()
    batcher = Batcher(handler, BatchLimits(max_queue_size=1))
    first = await busy(batcher, handler)
    (gave_up,) = submit_all(batcher, [1])
    await settle()
    gave_up.cancel()
    await settle()
    (accepted,) = submit_all(batcher, [2])
    await settle()
    handler.open()
    assert await accepted == 20
    await first
    assert handler.batches == [[0], [2]]


async def test_stop_fails_queued_waiters_and_lets_running_batches_finish() -> None:
    handler = GatedHandler()
    batcher = Batcher(handler)
    running = await busy(batcher, handler, 1)
    queued = submit_all(batcher, [2, 3])
    await settle()
    stopping = asyncio.create_task(batcher.stop())
    outcomes = await asyncio.gather(*queued, return_exceptions=True)
    assert all(isinstance(o, Unavailable) for o in outcomes)
    await settle()
    assert not stopping.done()  # it waits for the running batch
    handler.open()
    await stopping
    assert await running == 10
    assert handler.batches == [[1]]
    with pytest.raises(Unavailable):
        await batcher.submit(4)


async def test_stop_while_waiting_for_the_queue_delay() -> None:
    handler = GatedHandler(gated=False)
    batcher = Batcher(handler, BatchLimits(max_queue_delay_s=5.0))
    (task,) = submit_all(batcher, [1])
    await settle()
    await batcher.stop()
    with pytest.raises(Unavailable):
        await task
    assert handler.batches == []


async def test_stop_on_an_idle_batcher() -> None:
    batcher = Batcher(GatedHandler(gated=False))
    await batcher.stop()
    await batcher.stop()
    with pytest.raises(Unavailable):
        await batcher.submit(1)


# --- priorities and concurrency --------------------------------------------------------------


async def test_interactive_items_go_before_background_ones() -> None:
    handler = GatedHandler()
    batcher = Batcher(handler, BatchLimits(max_batch_size=1))
    first = await busy(batcher, handler)
    background = submit_all(batcher, [1, 2], priority=1)
    interactive = submit_all(batcher, [3, 4], priority=0)
    await settle()
    handler.open()
    await asyncio.gather(first, *background, *interactive)
    assert handler.batches == [[0], [3], [4], [1], [2]]


async def test_background_items_riding_with_interactive_ones_are_cut() -> None:
    handler = GatedHandler()
    limits = BatchLimits(max_batch_size=8, background_batch_size=3)
    batcher = Batcher(handler, limits)
    first = await busy(batcher, handler)
    background = submit_all(batcher, [1, 2, 3, 4, 5, 6], priority=1)
    interactive = submit_all(batcher, [7], priority=0)
    await settle()
    handler.open()
    await asyncio.gather(first, *background, *interactive)
    # The interactive item's batch is cut to 3; background alone fills max_batch_size.
    assert handler.batches == [[0], [7, 1, 2], [3, 4, 5, 6]]


async def test_no_background_item_joins_interactive_ones_past_the_cut() -> None:
    handler = GatedHandler()
    batcher = Batcher(handler, BatchLimits(max_batch_size=8, background_batch_size=2))
    first = await busy(batcher, handler)
    background = submit_all(batcher, [1, 2], priority=1)
    interactive = submit_all(batcher, [3, 4, 5], priority=0)
    await settle()
    handler.open()
    await asyncio.gather(first, *background, *interactive)
    assert handler.batches == [[0], [3, 4, 5], [1, 2]]


async def test_background_batches_keep_to_their_cost_budget() -> None:
    handler = GatedHandler()
    limits = BatchLimits(max_batch_size=8, max_background_cost=10)
    batcher = Batcher(handler, limits, cost=lambda item: item)
    first = await busy(batcher, handler)
    background = submit_all(batcher, [4, 5, 2, 25, 3, 3], priority=1)
    await settle()
    handler.open()
    assert await asyncio.gather(*background) == [40, 50, 20, 250, 30, 30]
    await first
    # 4+5 fit the budget, +2 would pass it; 25 is over it on its own and runs alone.
    assert handler.batches == [[0], [4, 5], [2], [25], [3, 3]]


async def test_the_background_budget_leaves_interactive_items_alone() -> None:
    handler = GatedHandler()
    limits = BatchLimits(max_batch_size=8, background_batch_size=8, max_background_cost=3)
    batcher = Batcher(handler, limits, cost=lambda item: item)
    first = await busy(batcher, handler)
    background = submit_all(batcher, [2, 2, 2], priority=1)
    interactive = submit_all(batcher, [5, 5, 5])
    await settle()
    handler.open()
    await asyncio.gather(first, *background, *interactive)
    # Interactive items take no share of the budget; the background ones riding with them keep
    # to it.
    assert handler.batches == [[0], [5, 5, 5, 2], [2], [2]]


async def test_a_background_budget_reached_does_not_wait_for_the_queue_delay() -> None:
    handler = GatedHandler(gated=False)
    limits = BatchLimits(max_batch_size=8, max_queue_delay_s=5.0, max_background_cost=4)
    batcher = Batcher(handler, limits, cost=lambda item: item)
    results = await asyncio.wait_for(
        asyncio.gather(*submit_all(batcher, [2, 2], priority=1)), timeout=1.0
    )
    assert results == [20, 20]
    assert handler.batches == [[2, 2]]


async def test_a_new_background_budget_applies_from_the_next_batch() -> None:
    handler = GatedHandler()
    batcher = Batcher(handler, BatchLimits(max_batch_size=8), cost=lambda item: item)
    first = await busy(batcher, handler)
    background = submit_all(batcher, [1, 1, 1, 1, 1], priority=1)
    await settle()
    batcher.limits.max_background_cost = 2  # what the inference service does as its pace changes
    handler.open()
    await asyncio.gather(first, *background)
    assert handler.batches == [[0], [1, 1], [1, 1], [1]]


async def test_max_in_flight_is_respected() -> None:
    handler = GatedHandler()
    batcher = Batcher(handler, BatchLimits(max_batch_size=1, max_in_flight=2))
    tasks = submit_all(batcher, [1, 2, 3, 4])
    await handler.wait_for_batches(2)
    await settle()
    assert (batcher.in_flight, batcher.queued) == (2, 2)
    handler.open()
    assert await asyncio.gather(*tasks) == [10, 20, 30, 40]
    assert handler.most_running == 2
    assert sorted(map(tuple, handler.batches)) == [(1,), (2,), (3,), (4,)]


# --- several items at once: enqueue and submit_many ------------------------------------------


async def test_items_enqueued_together_share_a_batch_on_an_idle_batcher() -> None:
    handler = GatedHandler(gated=False)
    batcher = Batcher(handler, BatchLimits(max_in_flight=4))
    futures = batcher.enqueue([1, 2, 3])
    assert await asyncio.gather(*futures) == [10, 20, 30]
    assert handler.batches == [[1, 2, 3]]


async def test_items_submitted_one_by_one_start_alone_while_slots_are_free() -> None:
    """What enqueue is for: one by one, each item takes a free slot as it arrives."""
    handler = GatedHandler(gated=False)
    batcher = Batcher(handler, BatchLimits(max_in_flight=2))
    assert await asyncio.gather(*submit_all(batcher, [1, 2, 3])) == [10, 20, 30]
    assert handler.batches == [[1], [2], [3]]


async def test_submit_many_shares_a_batch_and_answers_in_order() -> None:
    handler = GatedHandler(gated=False)
    batcher = Batcher(handler, BatchLimits(max_in_flight=4))
    assert await batcher.submit_many([3, 1, 2]) == [30, 10, 20]
    assert handler.batches == [[3, 1, 2]]


async def test_an_enqueued_item_cancelled_while_queued_is_dropped_before_compute() -> None:
    handler = GatedHandler()
    batcher = Batcher(handler)
    first = await busy(batcher, handler)
    dropped, kept = batcher.enqueue([1, 2])
    dropped.cancel()
    handler.open()
    assert await kept == 20
    await first
    assert handler.batches == [[0], [2]]


async def test_enqueue_past_the_queue_limit_refuses_every_item_at_once() -> None:
    handler = GatedHandler()
    batcher = Batcher(handler, BatchLimits(max_queue_size=2))
    first = await busy(batcher, handler)
    with pytest.raises(Overloaded):
        batcher.enqueue([1, 2, 3])
    assert batcher.queued == 0
    handler.open()
    await first
