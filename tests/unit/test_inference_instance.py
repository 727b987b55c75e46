"""How a model's config becomes its batcher's limits."""

from __future__ import annotations

from fmserve.repository import Batching
from services.inference.instance import _limits


def test_batching_config_becomes_batcher_limits() -> None:
    limits = _limits(Batching(max_batch_size=16, max_batch_tokens=512, max_queue_delay_ms=5), 1)
    assert (limits.max_batch_size, limits.max_batch_cost) == (16, 512)
    assert limits.max_queue_delay_s == 0.005
    assert limits.max_in_flight == 1


def test_instances_run_that_many_batches_at_once() -> None:
    assert _limits(Batching(), 3).max_in_flight == 3
