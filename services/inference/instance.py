"""One loaded model version: its runner, its batcher (one forward pass at a time, run by an
executor thread) and its statistics. A request is split into its sequences, each one batcher
item, so sequences of concurrent requests share forward passes; answers are reassembled in order.

Background work (job items) is paced: a forward pass cannot be interrupted, so the batcher gives
the background items of one batch a token budget that this model, at the pace of its recent
batches, runs in about `BACKGROUND_BATCH_S`. A sync request that arrives while job work runs
waits about that long at most before its own batch, whatever the model or the hardware; alone,
jobs still fill batches up to the model's limits when its batches are that fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from fmserve.core.batching import Batcher, BatchLimits
from fmserve.core.repository import Batching
from fmserve.errors import FmserveError, InputTooLong, InvalidInput
from services.inference import metrics, signature, warmup
from services.inference.audio_runner import AudioRunner
from services.inference.heap import HeapTrimmer
from services.inference.memory import Footprint
from services.inference.ragged import Layout, join, join_frames
from services.inference.runner import Runner
from services.inference.stats import ModelStats

log = logging.getLogger("fmserve.inference")

# fmserve's priority convention on the wire: 0 default, 1 highest (both interactive), >= 2
# background work such as async jobs, which the batcher serves only in the gaps.
BACKGROUND_PRIORITY = 2
# About one sync request's own time through the cluster (p50 ~23 ms on the 2-core CPU here).
# bench/jobs.py, sync p99 while a job runs over its p99 alone: 1.2-1.4x, against 2.9-3.2x with
# full background batches, for about 12% of the job's throughput (job alone).
BACKGROUND_BATCH_S = 0.02


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
    frames: np.ndarray | None = None
    """A per-frame output's frames per clip, INT32 [B, 1]; `array`'s rows are padded to the
    most."""


class Pace:
    """How long this model takes per token: recent batches' seconds over their tokens, both
    exponentially weighted, so the larger batches weigh more and a change of load shows within
    a few dozen batches."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self._seconds = 0.0
        self._tokens = 0.0

    def record(self, tokens: int, seconds: float) -> None:
        self._seconds = self._seconds * self.decay + seconds
        self._tokens = self._tokens * self.decay + tokens

    def tokens_in(self, seconds: float) -> int | None:
        """Tokens of a batch that takes about `seconds` (at least 1); None before any batch."""
        if self._seconds <= 0:
            return None
        return max(1, int(seconds * self._tokens / self._seconds))


class ModelInstance:
    """Serves one model version; the registry creates, tracks and closes it."""

    def __init__(
        self,
        runner: Runner | AudioRunner,
        version: str,
        executor: Executor,
        heap: HeapTrimmer | None = None,
    ) -> None:
        self.runner = runner
        self.config = runner.config
        self.version = version
        self.output = signature.output(self.config)
        self.stats = ModelStats()
        self.pace = Pace()
        self.last_used = time.monotonic()
        self._executor = executor
        self._heap = heap or HeapTrimmer(0, executor)
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.batcher: Batcher[np.ndarray, np.ndarray] = Batcher(
            self._run_batch,
            _limits(self.config.batching, runner.runtime.instances),
            cost=runner.cost,
            observer=self._observed,
        )
        metrics.QUEUED_SEQUENCES.watch(self.batcher, self.config.name)

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
        if self.config.task.per_frame:
            return InferOutput(self.output.name, *join_frames(outputs))
        return InferOutput(self.output.name, join(outputs, request.layout, self.runner.per_token))

    def footprint(self) -> Footprint:
        """The memory its weights take (memory.py)."""
        return self.runner.backend.footprint()

    async def warm_up(self) -> None:
        """Run the warm-up batches (warmup.py) before the version serves; an error is raised."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._warm_up)

    def _warm_up(self) -> None:
        if isinstance(self.runner, AudioRunner):
            for clips in warmup.audio_batches(self.config, self.version):
                self.runner.forward(clips)
            return
        if self.config.task.takes_images:
            for images in warmup.image_batches(self.config):
                self.runner.forward(images)
        if not self.config.task.takes_texts:
            return
        samples = warmup.samples(self.config, self.version)
        for batch in warmup.batches(self.config, self.runner.vocab_size, samples):
            self.runner.forward(batch)

    async def close(self, grace_s: float) -> None:
        """Let requests in progress finish (up to `grace_s`), then stop the batcher."""
        # past the grace, the batcher answers what is still queued with UNAVAILABLE (retryable)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        await self.batcher.stop()
        metrics.QUEUED_SEQUENCES.forget(self.batcher)

    def _check(self, request: InferRequest) -> None:
        names = [spec.name for spec in signature.outputs(self.config)]
        unknown = set(request.outputs) - set(names)
        if unknown:
            raise InvalidInput(
                f"model {self.config.name!r} has no output {sorted(unknown)[0]!r}; "
                f"it answers {' and '.join(repr(name) for name in names)}"
            )
        if isinstance(self.runner, AudioRunner):
            self._check_clips(request.sequences, self.runner)
            return
        self._check_tokens(request, self.runner)

    def _check_clips(self, clips: list[np.ndarray], runner: AudioRunner) -> None:
        rate = runner.features.sampling_rate
        if clips[0].dtype != np.float32:
            raise InvalidInput(
                f"model {self.config.name!r} takes audio: send input_values (FP32 samples at "
                f"{rate} Hz) and lengths, not token ids"
            )
        longest = max(clip.size for clip in clips)
        if longest > self.config.max_length:
            raise InputTooLong(
                f"a clip has {longest} samples ({longest / rate:.1f} s at {rate} Hz); model "
                f"{self.config.name!r} takes at most {self.config.max_length}: cut it shorter"
            )
        shortest, least = min(clip.size for clip in clips), runner.framing.min_samples
        if shortest < least:
            raise InvalidInput(
                f"a clip has {shortest} samples; model {self.config.name!r} needs at least "
                f"{least} ({least / rate * 1000:g} ms at {rate} Hz)"
            )
        if not all(np.isfinite(clip).all() for clip in clips):
            raise InvalidInput("input_values holds NaN or infinite samples")

    def _check_tokens(self, request: InferRequest, runner: Runner) -> None:
        """Token ids, or an image model's pixel_values ([3, H, W] per image)."""
        if request.sequences[0].ndim == 3:
            self._check_images(request.sequences[0].shape)
            return
        if request.sequences[0].dtype == np.float32:
            raise InvalidInput(
                f"model {self.config.name!r} takes text: send input_ids, not input_values"
            )
        self._check_ids(request, runner)

    def _check_images(self, shape: tuple[int, ...]) -> None:
        task, size = self.config.task, self.config.image_size
        if not task.takes_images:
            raise InvalidInput(
                f"model {self.config.name!r} does {task.value} and takes input_ids, not "
                "pixel_values"
            )
        if shape != (3, size, size):
            raise InvalidInput(
                f"pixel_values: images of shape {list(shape)}; model {self.config.name!r} takes "
                f"[3, {size}, {size}] (its processor's output: preprocess Featurize makes it)"
            )

    def _check_ids(self, request: InferRequest, runner: Runner) -> None:
        if not self.config.task.takes_texts:
            raise InvalidInput(
                f"model {self.config.name!r} does {self.config.task.value} and takes "
                "pixel_values [B, 3, H, W], not input_ids"
            )
        longest = max(len(s) for s in request.sequences)
        if longest > self.config.max_length:
            raise InputTooLong(
                f"a sequence has {longest} tokens; model {self.config.name!r} takes at most "
                f"{self.config.max_length}; truncate the text or split it"
            )
        for sequence in request.sequences:
            if sequence.min() < 0 or sequence.max() >= runner.vocab_size:
                raise InvalidInput(
                    f"token ids must lie in [0, {runner.vocab_size}) for model "
                    f"{self.config.name!r}; tokenize with the model's own tokenizer"
                )
        if request.layout.mask_assumed:
            self._check_unpadded(request.sequences, runner.pad_token_id)

    def _check_unpadded(self, sequences: list[np.ndarray], pad: int | None) -> None:
        """Padded input_ids without attention_mask: refused when a row holds the pad token
        (its padding would be embedded as text), or, for a model without one, when there are
        several rows (padding cannot be told from text)."""
        fix = "send attention_mask [B, T] (1 for tokens, 0 for padding) or the ragged form"
        if pad is None and len(sequences) > 1:
            raise InvalidInput(
                f"input_ids has {len(sequences)} rows and no attention_mask; model "
                f"{self.config.name!r} has no pad token to tell padding by: {fix}"
            )
        if pad is not None and any((sequence == pad).any() for sequence in sequences):
            raise InvalidInput(
                f"input_ids holds the pad token id {pad} but no attention_mask came with it, "
                f"so its padding would count as text: {fix}"
            )

    def _enter(self) -> None:
        self.last_used = time.monotonic()
        self._active += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    async def _run_batch(self, sequences: list[np.ndarray]) -> Sequence[np.ndarray | Exception]:
        try:
            return await self._forward(sequences)
        except FmserveError:
            raise  # the batch's own fault (out of memory): every sequence shares it
        except Exception:
            if len(sequences) == 1:
                raise
        # A sequence that crashes the model must not fail the requests batched with it: run
        # each alone, so only the one at fault gets the error.
        log.exception("a batch of %d failed; running its sequences one by one", len(sequences))
        outcomes: list[np.ndarray | Exception] = []
        for sequence in sequences:
            try:
                outcomes.extend(await self._forward([sequence]))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    async def _forward(self, sequences: list[np.ndarray]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        with self._heap.working():
            forward = await loop.run_in_executor(self._executor, self.runner.forward, sequences)
        self.stats.record_batch(
            len(sequences), forward.input_ns, forward.infer_ns, forward.output_ns
        )
        seconds = forward.total_ns / 1e9
        self._pace_background(sum(self.runner.cost(s) for s in sequences), seconds)
        metrics.COMPUTE_DURATION.labels(self.config.name).observe(seconds)
        return forward.outputs

    def _pace_background(self, tokens: int, seconds: float) -> None:
        self.pace.record(tokens, seconds)
        self.batcher.limits.max_background_cost = self.pace.tokens_in(BACKGROUND_BATCH_S)

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
