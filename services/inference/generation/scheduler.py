"""Continuous batching for one model version: the scheduler owns its waiting and running
sequences, the KV budget and the engine's batch, and one task steps them.

Each turn of the loop:
1. sequences that finished or were cancelled leave the batch (their KV memory is freed);
2. waiting sequences are admitted, first come first served, while the budget has room and the
   turn's prefill work (rows x padded prompt length, `max_prefill_tokens`) allows; they are
   prefilled together in one forward pass, reusing the cached KV of a prompt prefix seen
   before (prefix.py), and each streams its first token at once;
3. every running sequence decodes one token in one forward pass, and streams it.
A new request therefore joins at the next turn, and nobody waits for another to finish. A
sequence waits for admission at most `max_wait_s`, then gets RESOURCE_EXHAUSTED. A sequence whose
sampling fails fails alone; a forward pass that fails fails the sequences in it.

Model work runs in the executor thread, one call at a time; the loop only does bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from fmserve.errors import FmserveError, Overloaded, Unavailable
from services.inference import metrics
from services.inference.generation.budget import KvBudget
from services.inference.generation.engine import Engine, Prefilled, Prompt, Step
from services.inference.generation.params import Checked
from services.inference.generation.prefix import PrefixCache
from services.inference.generation.sampling import generator, next_token
from services.inference.generation.stopping import CANCELLED, finish_reason
from services.inference.stats import ModelStats

log = logging.getLogger("fmserve.inference.generation")

T = TypeVar("T")


@dataclass(frozen=True)
class Tokens:
    ids: tuple[int, ...]


@dataclass(frozen=True)
class Finished:
    reason: str
    """"stop" (EOS or a stop token id), "length" (max_new_tokens, or the context is full) or
    "cancelled" (the model was unloaded, or the service stopped, before it ended)."""
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


Event = Tokens | Finished


@dataclass(eq=False)
class Sequence:
    id: int
    request: Checked
    stop_ids: frozenset[int]
    deadline: float
    """Admission deadline (monotonic)."""
    events: asyncio.Queue[Event | FmserveError] = field(default_factory=asyncio.Queue)
    rng: torch.Generator | None = None
    prompt: Prompt | None = None
    """Set at admission: the prompt as it is prefilled (with the prefix it reuses)."""
    generated: list[int] = field(default_factory=list)
    arrived: float = field(default_factory=time.perf_counter)
    last_token_at: float = 0.0
    done: bool = False
    """Finished, failed or cancelled: it leaves the batch at the next turn."""

    def seen(self) -> torch.Tensor:
        """The repetition penalty's history: prompt and generated tokens."""
        return torch.tensor([*self.request.prompt_ids, *self.generated], dtype=torch.long)


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        model: str,
        context: int,
        eos_ids: frozenset[int],
        budget: KvBudget,
        max_wait_s: float,
        executor: Executor,
        stats: ModelStats,
        working: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
        max_prefill_tokens: int = 2048,
        prefix_cache_tokens: int = 0,
    ) -> None:
        self.engine = engine
        self.model = model
        self.context = context
        self.eos_ids = eos_ids
        self.budget = budget
        self.max_wait_s = max_wait_s
        self.max_prefill_tokens = max_prefill_tokens
        self.prefixes = PrefixCache(prefix_cache_tokens)
        self.stats = stats
        self._executor = executor
        self._working = working
        self._ids = itertools.count()
        self._waiting: deque[Sequence] = deque()
        self._running: dict[int, Sequence] = {}
        self._leaving: set[int] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def active(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def generate(self, request: Checked) -> AsyncIterator[Event]:
        """The sequence's tokens as they come, then its Finished; raises its error. Leaving
        early (the caller cancelled) frees the sequence at the next turn."""
        if self._stopped:
            raise Unavailable(f"model {self.model!r} is unloading; retry")
        self.budget.check_possible(request.reserved_tokens)
        sequence = self._enqueue(request)
        try:
            while True:
                for event in _merged(await _ready(sequence.events)):
                    yield event
                    if isinstance(event, Finished):
                        return
        finally:
            self._abandon(sequence)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """End the loop. A running sequence ends "cancelled" with the tokens it has streamed;
        one with none yet, like a waiting one, fails UNAVAILABLE (retryable: nothing done)."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        failure = Unavailable(f"model {self.model!r} was unloaded; retry")
        for sequence in [*self._waiting, *self._running.values()]:
            if sequence.generated and not sequence.done:
                self._finish(sequence, CANCELLED, time.perf_counter())
            else:
                self._fail(sequence, failure)
        self._waiting.clear()

    # --- the loop ----------------------------------------------------------------------------

    def _enqueue(self, request: Checked) -> Sequence:
        sequence = Sequence(
            id=next(self._ids),
            request=request,
            stop_ids=self.eos_ids | request.stop_token_ids,
            deadline=time.monotonic() + self.max_wait_s,
            rng=generator(request.sampling),
        )
        self._waiting.append(sequence)
        self._gauges()
        self._wake.set()
        return sequence

    def _abandon(self, sequence: Sequence) -> None:
        if sequence.done:
            return
        sequence.done = True
        if sequence in self._waiting:
            self._waiting.remove(sequence)
        elif sequence.id in self._running:
            self._leave(sequence)
        self._gauges()
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self._turn()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end every future stream: log, go on
                log.exception("generation step failed for model %s", self.model)
                self._fail_running(Unavailable("the generation step failed; retry"))

    async def _turn(self) -> None:
        self._expire_waiting()
        admitted = self._admit()
        if admitted:
            await self._prefill(admitted)
        if self._running:
            await self._decode()
        elif self._leaving:
            await self._call(self.engine.batch.remove, self._take_leaving())
            self._gauges()
        elif not self._waiting:
            self._wake.clear()
            await self._wake.wait()
        elif not admitted:
            await asyncio.sleep(0.005)  # a waiting head that cannot fit yet (rows leaving)

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        for sequence in [s for s in self._waiting if s.deadline <= now]:
            self._waiting.remove(sequence)
            self._fail(
                sequence,
                Overloaded(
                    f"no room in model {self.model!r}'s KV-cache budget within "
                    f"{self.max_wait_s:g} s ({self.budget.sequences} sequences running); "
                    "retry later"
                ),
            )
        self._gauges()

    def _admit(self) -> list[Sequence]:
        """The sequences to prefill this turn: in arrival order, while the KV budget has room
        and the pass stays within max_prefill_tokens (the first one goes even if alone over)."""
        admitted: list[Sequence] = []
        width = 0
        while self._waiting and self.budget.fits(self._waiting[0].request.reserved_tokens):
            sequence = self._waiting[0]
            ids = sequence.request.prompt_ids
            prompt = Prompt(ids, self.prefixes.find(ids))
            rest = max(width, len(ids) - prompt.cached)
            if admitted and (len(admitted) + 1) * rest > self.max_prefill_tokens:
                break
            self._waiting.popleft()
            width, sequence.prompt = rest, prompt
            self.budget.take(sequence.request.reserved_tokens)
            self._running[sequence.id] = sequence
            admitted.append(sequence)
        self._gauges()
        return admitted

    async def _prefill(self, sequences: list[Sequence]) -> None:
        leaving = self._take_leaving()
        try:
            step, tokens = await self._call(self._prefill_sync, leaving, sequences)
        except Exception as exc:
            for sequence in sequences:
                self._fail(sequence, _as_error(exc, "prefill"))
                self._leave(sequence)
            return
        self.stats.record_batch(len(sequences), 0, int(step.seconds * 1e9), 0)
        self._emit_all(sequences, tokens, "prefill")

    async def _decode(self) -> None:
        leaving = self._take_leaving()
        rows = [sid for sid in self.engine.batch.rows if sid not in leaving]
        sequences = [self._running[sid] for sid in rows]
        try:
            step, tokens = await self._call(self._decode_sync, leaving, sequences)
        except Exception as exc:
            for sequence in sequences:
                self._fail(sequence, _as_error(exc, "decoding step"))
                self._leave(sequence)
            return
        self.stats.record_batch(len(rows), 0, int(step.seconds * 1e9), 0)
        metrics.DECODE_STEP_DURATION.labels(self.model).observe(step.seconds)
        self._emit_all(sequences, tokens, "sampling")

    def _emit_all(
        self, sequences: list[Sequence], tokens: list[int | Exception], where: str
    ) -> None:
        for sequence, token in zip(sequences, tokens, strict=True):
            if isinstance(token, Exception):
                self._fail(sequence, _as_error(token, where))
                self._leave(sequence)
            elif not sequence.done:  # cancelled while the call ran: its token is dropped
                self._emit(sequence, token)

    async def _call(self, function: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        with self._working():
            return await loop.run_in_executor(self._executor, _no_grad(function), *args)

    # --- in the executor thread ------------------------------------------------------------

    def _prefill_sync(
        self, leaving: set[int], sequences: list[Sequence]
    ) -> tuple[Step, list[int | Exception]]:
        self.engine.batch.remove(leaving)
        prefilled = self.engine.prefill(
            [s.prompt or Prompt(s.request.prompt_ids) for s in sequences]
        )
        self.engine.batch.add([s.id for s in sequences], prefilled.layers, prefilled.lengths)
        if self.prefixes.max_tokens:
            self._keep_prefixes(sequences, prefilled)
        return prefilled.step, self._sample_all(sequences, prefilled.step.logits)

    def _keep_prefixes(self, sequences: list[Sequence], prefilled: Prefilled) -> None:
        columns = prefilled.layers[0][0].shape[2]
        for row, (sequence, length) in enumerate(zip(sequences, prefilled.lengths, strict=True)):
            start = columns - length
            layers = [
                (k[row : row + 1, :, start:].clone(), v[row : row + 1, :, start:].clone())
                for k, v in prefilled.layers
            ]
            self.prefixes.add(sequence.request.prompt_ids, layers)

    def _decode_sync(
        self, leaving: set[int], sequences: list[Sequence]
    ) -> tuple[Step, list[int | Exception]]:
        self.engine.batch.remove(leaving)
        step = self.engine.decode([s.generated[-1] for s in sequences])
        return step, self._sample_all(sequences, step.logits)

    def _sample_all(self, sequences: list[Sequence], logits: torch.Tensor) -> list[int | Exception]:
        tokens: list[int | Exception] = []
        for row, sequence in enumerate(sequences):
            try:
                tokens.append(self._sample(sequence, logits[row]))
            except Exception as exc:  # fails this sequence only
                log.exception("sampling failed for a sequence of model %s", self.model)
                tokens.append(exc)
        return tokens

    def _sample(self, sequence: Sequence, logits: torch.Tensor) -> int:
        sampling = sequence.request.sampling
        seen = sequence.seen() if sampling.repetition_penalty != 1.0 else _NOTHING
        return next_token(logits, sampling, seen, sequence.rng)

    # --- bookkeeping -----------------------------------------------------------------------

    def _emit(self, sequence: Sequence, token: int) -> None:
        now = time.perf_counter()
        first = not sequence.generated
        sequence.generated.append(token)
        if first:
            metrics.TIME_TO_FIRST_TOKEN.labels(self.model).observe(now - sequence.arrived)
        else:
            metrics.INTER_TOKEN_LATENCY.labels(self.model).observe(now - sequence.last_token_at)
        sequence.last_token_at = now
        metrics.TOKENS_GENERATED.labels(self.model).inc()
        sequence.events.put_nowait(Tokens((token,)))
        prompt = len(sequence.request.prompt_ids)
        generated = len(sequence.generated)
        reason = finish_reason(
            token,
            generated,
            sequence.request.max_new_tokens,
            prompt + generated,
            self.context,
            sequence.stop_ids,
        )
        if reason is not None:
            self._finish(sequence, reason, now)

    def _finish(self, sequence: Sequence, reason: str, now: float) -> None:
        cached = sequence.prompt.cached if sequence.prompt else 0
        prompt = len(sequence.request.prompt_ids)
        sequence.events.put_nowait(Finished(reason, prompt, len(sequence.generated), cached))
        self.stats.record_request(True, int((now - sequence.arrived) * 1e9))
        sequence.done = True
        self._leave(sequence)

    def _leave(self, sequence: Sequence) -> None:
        """Out of the running set; its rows go at the start of the next model call."""
        if self._running.pop(sequence.id, None) is not None:
            self.budget.give_back(sequence.request.reserved_tokens)
            self._leaving.add(sequence.id)
        self._gauges()

    def _take_leaving(self) -> set[int]:
        leaving, self._leaving = self._leaving, set()
        return leaving

    def _fail(self, sequence: Sequence, error: FmserveError) -> None:
        if not sequence.done:
            sequence.done = True
            self.stats.record_request(False, int((time.perf_counter() - sequence.arrived) * 1e9))
            sequence.events.put_nowait(error)

    def _fail_running(self, error: FmserveError) -> None:
        for sequence in list(self._running.values()):
            self._fail(sequence, error)
            self._leave(sequence)

    def _gauges(self) -> None:
        metrics.SEQUENCES_ACTIVE.labels(self.model).set(len(self._running))
        metrics.SEQUENCES_WAITING.labels(self.model).set(len(self._waiting))
        metrics.KV_TOKENS_RESERVED.labels(self.model).set(self.budget.tokens)
        metrics.KV_TOKENS.labels(self.model).set(self.engine.batch.tokens)


_NOTHING = torch.zeros(0, dtype=torch.long)


async def _ready(events: asyncio.Queue[Event | FmserveError]) -> list[Event]:
    """The next event and every one already queued behind it (a slow reader gets several
    tokens at once); raises a sequence's error."""
    ready = [await events.get()]
    while not events.empty():
        ready.append(events.get_nowait())
    for event in ready:
        if isinstance(event, FmserveError):
            raise event
    return [e for e in ready if not isinstance(e, FmserveError)]


def _merged(events: list[Event]) -> list[Event]:
    tokens = tuple(t for e in events if isinstance(e, Tokens) for t in e.ids)
    finished = [e for e in events if isinstance(e, Finished)]
    return [*([Tokens(tokens)] if tokens else []), *finished]


def _no_grad(function: Callable[..., T]) -> Callable[..., T]:
    def run(*args: object) -> T:
        with torch.inference_mode():
            return function(*args)

    return run


def _as_error(exc: BaseException, where: str) -> FmserveError:
    if isinstance(exc, FmserveError):
        return exc
    log.error("generation %s failed", where, exc_info=exc)
    return Unavailable(f"the model failed during its {where}; the inference service's log has it")
