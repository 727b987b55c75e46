"""One loaded model version: its runner, its batcher (one forward pass at a time, run by an
executor thread) and its statistics. A request is split into its sequences, each one batcher
item, so sequences of concurrent requests share forward passes; answers are reassembled in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from fmserve.batching import Batcher, BatchLimits
from fmserve.errors import InputTooLong, InvalidInput
from fmserve.repository import Batching
from services.inference import metrics, signature
from services.inference.ragged import Layout, join
from services.inference.runner import Runner
from services.inference.stats import ModelStats

# fmserve's priority convention on the wire: 0 default, 1 highest (both interactive), >= 2
# background work such as async jobs, which the batcher serves only in the gaps.
BACKGROUND_PRIORITY = 2


@dataclass(frozen=True)
class InferRequest:
    model: str
    version: str
    sequences: list[np.ndarray]
    layout: Layout = field(default_factory=Layout)
    priority: int = 0
    outputs: tuple[str, ...] = ()
    """Outputs the client named; empty means all (there is one)."""


@dataclass(frozen=True)
class InferOutput:
    name: str
    array: np.ndarray


class ModelInstance:
    """Serves one model version; the registry creates, tracks and closes it."""

    def __init__(self, runner: Runner, version: str, executor: Executor) -> None:
        self.runner = runner
        self.config = runner.config
        self.version = version
        self.output = signature.output(self.config)
        self.stats = ModelStats()
        self.last_used = time.monotonic()
        self._executor = executor
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.batcher: Batcher[np.ndarray, np.ndarray] = Batcher(
            self._run_batch,
            _limits(self.config.batching, self.config.runtime.instances),
            cost=len,
            observer=self._observed,
        )

    @property
    def idle(self) -> bool:
        return self._active == 0

    async def infer(self, request: InferRequest) -> InferOutput:
        """Run every sequence of a request through the batcher; raises the first error."""
        self._check(request)
        self._enter()
        started, ok = time.perf_counter_ns(), False
        try:
            priority = 1 if request.priority >= BACKGROUND_PRIORITY else 0
            outputs = await self.batcher.submit_many(request.sequences, priority)
            ok = True
        finally:
            self.stats.record_request(ok, time.perf_counter_ns() - started)
            self._leave()
        return InferOutput(self.output.name, join(outputs, request.layout, self.runner.per_token))

    async def close(self, grace_s: float) -> None:
        """Let requests in progress finish (up to `grace_s`), then stop the batcher."""
        # past the grace, the batcher answers what is still queued with UNAVAILABLE (retryable)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        await self.batcher.stop()

    def _check(self, request: InferRequest) -> None:
        unknown = set(request.outputs) - {self.output.name}
        if unknown:
            raise InvalidInput(
                f"model {self.config.name!r} has no output {sorted(unknown)[0]!r}; "
                f"it answers {self.output.name!r}"
            )
        longest = max(len(s) for s in request.sequences)
        if longest > self.config.max_length:
            raise InputTooLong(
                f"a sequence has {longest} tokens; model {self.config.name!r} takes at most "
                f"{self.config.max_length}; truncate the text or split it"
            )
        for sequence in request.sequences:
            if sequence.min() < 0 or sequence.max() >= self.runner.vocab_size:
                raise InvalidInput(
                    f"token ids must lie in [0, {self.runner.vocab_size}) for model "
                    f"{self.config.name!r}; tokenize with the model's own tokenizer"
                )

    def _enter(self) -> None:
        self.last_used = time.monotonic()
        self._active += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    async def _run_batch(self, sequences: list[np.ndarray]) -> list[np.ndarray]:
        started = time.perf_counter_ns()
        loop = asyncio.get_running_loop()
        outputs = await loop.run_in_executor(self._executor, self.runner.forward, sequences)
        elapsed = time.perf_counter_ns() - started
        self.stats.record_batch(len(sequences), elapsed)
        metrics.COMPUTE_DURATION.labels(self.config.name).observe(elapsed / 1e9)
        return outputs

    def _observed(self, size: int, delays_s: list[float]) -> None:
        metrics.BATCH_SIZE.labels(self.config.name).observe(size)
        delay = metrics.QUEUE_DELAY.labels(self.config.name)
        for seconds in delays_s:
            delay.observe(seconds)
        self.stats.record_queued(delays_s)


def _limits(batching: Batching, instances: int) -> BatchLimits:
    # A batch's cost is the sum of its sequences' tokens; padding to the longest adds at most
    # what the shortest lack, a fair price for not sorting across requests.
    return BatchLimits(
        max_batch_size=batching.max_batch_size,
        max_batch_cost=batching.max_batch_tokens,
        max_queue_delay_s=batching.max_queue_delay_ms / 1000,
        max_in_flight=instances,
    )
