"""How a model's config becomes its batcher's limits, and how background work is paced."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fmserve.core.repository import Batching, ModelRepository
from fmserve.errors import InvalidInput
from services.inference.instance import (
    BACKGROUND_BATCH_S,
    BACKGROUND_PRIORITY,
    InferRequest,
    ModelInstance,
    Pace,
    _limits,
)
from services.inference.ragged import split_padded
from services.inference.registry import ModelRegistry

pytestmark = pytest.mark.timeout(60)
torch.set_num_threads(1)


def test_batching_config_becomes_batcher_limits() -> None:
    limits = _limits(Batching(max_batch_size=16, max_batch_tokens=512, max_queue_delay_ms=5), 1)
    assert (limits.max_batch_size, limits.max_batch_cost) == (16, 512)
    assert limits.max_queue_delay_s == 0.005
    assert limits.max_in_flight == 1


def test_instances_run_that_many_batches_at_once() -> None:
    assert _limits(Batching(), 3).max_in_flight == 3


def test_a_pace_turns_a_time_into_tokens() -> None:
    pace = Pace()
    assert pace.tokens_in(0.02) is None  # no batch yet: no budget
    pace.record(tokens=100, seconds=0.01)
    assert pace.tokens_in(0.02) == 200
    assert pace.tokens_in(0.00001) == 1  # a batch always holds something


def test_a_pace_weighs_larger_batches_more() -> None:
    pace = Pace()
    pace.record(tokens=1000, seconds=0.1)  # 10,000 tokens/s
    pace.record(tokens=10, seconds=0.01)  # 1,000 tokens/s
    assert pace.tokens_in(1.0) in range(9_000, 9_201)


def test_a_pace_follows_a_change_of_speed() -> None:
    pace = Pace()
    for _ in range(50):
        pace.record(tokens=1000, seconds=0.1)
    for _ in range(50):
        pace.record(tokens=1000, seconds=1.0)  # the machine got busy: 10x slower
    assert pace.tokens_in(1.0) in range(1_000, 1_051)


async def test_background_work_gets_the_budget_its_model_runs_in_the_time(
    model_repository: Path,
) -> None:
    registry = ModelRegistry(ModelRepository(model_repository), grace_s=1.0)
    await registry.start()
    try:
        instance = await registry.instance("tiny-classifier")
        assert instance.batcher.limits.max_background_cost is None
        sequences = [np.array([101, 7, 8, 102], dtype=np.int64)] * 3
        request = InferRequest("tiny-classifier", instance.version, sequences)
        await instance.infer(request)
        background = InferRequest(
            "tiny-classifier", instance.version, sequences, priority=BACKGROUND_PRIORITY
        )
        await instance.infer(background)
    finally:
        await registry.stop()
    budget = instance.batcher.limits.max_background_cost
    assert budget is not None and budget >= 1
    assert budget == instance.pace.tokens_in(BACKGROUND_BATCH_S)


async def test_a_sequence_that_crashes_the_model_fails_alone(model_repository: Path) -> None:
    # tiny-overreach takes 256 tokens by its config but has 128 position embeddings
    registry = ModelRegistry(ModelRepository(model_repository), grace_s=1.0)
    await registry.start()
    try:
        instance = await registry.instance("tiny-overreach")
        good = np.array([101, 7, 8, 102], dtype=np.int64)
        bad = np.array([101, *[7] * 150, 102], dtype=np.int64)
        outcomes = await instance._run_batch([good, bad, good])
    finally:
        await registry.stop()
    assert isinstance(outcomes[1], Exception)
    assert all(isinstance(o, np.ndarray) and o.shape == (3,) for o in (outcomes[0], outcomes[2]))


@pytest.mark.parametrize(
    ("pad_token_id", "rows", "error"),
    [
        (0, [[101, 7, 102], [101, 102, 0]], "holds the pad token id 0"),
        (0, [[101, 7, 102], [101, 8, 102]], None),  # nothing padded: no mask needed
        (None, [[101, 7, 102], [101, 8, 102]], "has no pad token"),
        (None, [[101, 7, 102]], None),  # one row has nothing to be padded to
    ],
)
def test_padded_rows_need_a_mask_when_they_may_hold_padding(
    model_repository: Path, pad_token_id: int | None, rows: list[list[int]], error: str | None
) -> None:
    config = ModelRepository(model_repository).get("tiny-classifier")
    runner = SimpleNamespace(
        config=config,
        runtime=config.runtime,
        vocab_size=30522,
        per_token=False,
        cost=len,
        pad_token_id=pad_token_id,
    )
    instance = ModelInstance(runner, "1", ThreadPoolExecutor(1))  # type: ignore[arg-type]
    sequences, layout = split_padded(np.array(rows, dtype=np.int64))
    request = InferRequest("tiny-classifier", "1", sequences, layout)
    if error is None:
        instance._check(request)
        return
    with pytest.raises(InvalidInput, match="attention_mask") as caught:
        instance._check(request)
    assert error in caught.value.message
