"""The gateway's generation domain: one Generate call from request to finished generation.

prompt → preprocess EncodePrompt → inference ModelStreamInfer ⇄ postprocess Detokenize → the
caller. Each inference step's tokens go to postprocess, whose reply (the text they made final)
goes to the caller with them. When postprocess reports a stop string, or the caller leaves, the
inference stream is cancelled, which frees the sequence in the engine within one step. A
deterministic request is answered from the result cache when it can be, and stored after."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field

from opentelemetry import trace

from fmserve.core import context
from fmserve.core.tasks import TaskName
from fmserve.errors import DeadlineExceeded, InvalidInput
from fmserve.v1 import common_pb2
from services.gateway import principal
from services.gateway.cache_keys import generation_key
from services.gateway.gateway import CachePolicy
from services.gateway.metrics import INTER_TOKEN_LATENCY, TIME_TO_FIRST_TOKEN, TOKENS_GENERATED
from services.gateway.outcomes import Outcomes
from services.gateway.result_cache import ResultCache
from services.gateway.routes import Route, Router
from services.gateway.sampling import Prompt, Sampling, StopLimits, check_prompt_size, checked
from services.gateway.stages import StageClients


@dataclass(frozen=True)
class GenerateCall:
    model: str
    prompt: Prompt
    version: str = ""
    sampling: Sampling = field(default_factory=Sampling)
    cache_policy: CachePolicy = CachePolicy.USE
    routing_key: str = ""


@dataclass(frozen=True)
class Delta:
    """Text and tokens produced since the previous delta."""

    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class Finished:
    route: Route
    generation: common_pb2.Generation
    cached: bool = False


Event = Delta | Finished


class Generator:
    def __init__(
        self,
        router: Router,
        stages: StageClients,
        cache: ResultCache,
        limits: StopLimits,
        timeout_s: float,
        outcomes: Outcomes,
    ) -> None:
        self.router = router
        self.stages = stages
        self.cache = cache
        self.limits = limits
        self.timeout_s = timeout_s
        self.outcomes = outcomes

    async def generate(self, call: GenerateCall) -> AsyncGenerator[Event, None]:
        """Deltas as text becomes final, then the finished generation; the stream's outcome
        is counted for the version that answered (outcomes.py: metrics, guards)."""
        started = time.monotonic()
        route = self.router.route(
            call.model, call.version, TaskName.TEXT_GENERATION, False, 0, call.routing_key
        )
        async with aclosing(self._generate(call, route, started)) as events:
            try:
                async for event in events:
                    if isinstance(event, Finished):  # before it leaves: the caller may go
                        self.outcomes.record(route.model, route.version, True, _since(started))
                    yield event
            except InvalidInput:
                raise  # the caller's mistake, not the version's
            except Exception:
                self.outcomes.record(route.model, route.version, False, _since(started))
                raise

    async def _generate(
        self, call: GenerateCall, route: Route, started: float
    ) -> AsyncGenerator[Event, None]:
        deadline = started + context.remaining_s(self.timeout_s)
        sampling = checked(call.sampling, self.router.repository.get(route.model), self.limits)
        check_prompt_size(call.prompt, self.router.max_text_chars)
        key = generation_key(route, call.prompt, sampling) if sampling.deterministic else None
        if (hit := await self._cached(route, key, call.cache_policy)) is not None:
            yield Delta(hit.text, list(hit.token_ids))
            yield Finished(route, hit, cached=True)
            return
        input_ids = await self.stages.encode_prompt(
            route, call.prompt, sampling.max_new_tokens or 0, _left(deadline)
        )
        run = _Run(route, len(input_ids), started)
        # Closed with this generator, so a caller who leaves cancels the inference at once.
        async with aclosing(self._stream(run, input_ids, sampling, deadline)) as deltas:
            async for delta in deltas:
                yield delta
        # a generation cut short by a draining inference service is not the answer to keep
        complete = run.generation.finish_reason != "cancelled"
        if key and complete and call.cache_policy is not CachePolicy.BYPASS:
            self.cache.store([(key, common_pb2.Result(generation=run.generation))])
        _annotate(run.generation)
        yield Finished(route, run.generation)

    async def _cached(
        self, route: Route, key: str | None, policy: CachePolicy
    ) -> common_pb2.Generation | None:
        """The cached generation, when the request may use one (deterministic, policy USE)."""
        if key is None or policy is not CachePolicy.USE:
            return None
        [hit] = await self.cache.lookup(route.model, [key])
        if hit is None or not hit.HasField("generation"):
            return None
        TOKENS_GENERATED.labels(route.model).inc(len(hit.generation.token_ids))
        principal.spend(len(hit.generation.token_ids))  # its key's quota: tokens delivered
        return hit.generation

    async def _stream(
        self, run: _Run, input_ids: list[int], sampling: Sampling, deadline: float
    ) -> AsyncGenerator[Delta, None]:
        inference = self.stages.generation(
            run.route, input_ids, sampling, context.request_id.get(), _left(deadline)
        )
        detokenizer = self.stages.detokenizer(run.route, sampling.stop, _left(deadline))
        async with inference, detokenizer:
            async for step in inference.steps():
                reply = await detokenizer.step(step.token_ids, finished=step.final)
                run.took(step.token_ids, reply.text)
                if step.token_ids or reply.text:
                    yield Delta(reply.text, step.token_ids)
                if reply.stopped:
                    run.finish("stop", None)
                    return  # leaving the `async with` cancels the inference stream
                if step.final:
                    run.finish(step.finish_reason, step.usage)
                    return


@dataclass
class _Run:
    """What one streaming generation has produced so far, and its timing metrics."""

    route: Route
    prompt_tokens: int
    started: float
    last_token: float | None = None
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    generation: common_pb2.Generation = field(default_factory=common_pb2.Generation)

    def took(self, token_ids: list[int], text: str) -> None:
        self.text.append(text)
        if not token_ids:
            return
        now, model = time.monotonic(), self.route.model
        if self.last_token is None:
            TIME_TO_FIRST_TOKEN.labels(model).observe(now - self.started)
        else:
            gap = (now - self.last_token) / len(token_ids)
            for _ in token_ids:
                INTER_TOKEN_LATENCY.labels(model).observe(gap)
        TOKENS_GENERATED.labels(model).inc(len(token_ids))
        principal.spend(len(token_ids))  # its key's quota: what is not spent is given back
        self.last_token = now
        self.token_ids.extend(token_ids)

    def finish(self, reason: str, usage: common_pb2.Usage | None) -> None:
        completion = len(self.token_ids)
        self.generation = common_pb2.Generation(
            text="".join(self.text),
            token_ids=self.token_ids,
            finish_reason=reason,
            usage=usage
            or common_pb2.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion),
        )


def _annotate(generation: common_pb2.Generation) -> None:
    """The stream's span (opened by the server interceptor) says how the generation went."""
    span = trace.get_current_span()
    span.set_attribute("fmserve.generation.prompt_tokens", generation.usage.prompt_tokens)
    span.set_attribute("fmserve.generation.completion_tokens", generation.usage.completion_tokens)
    span.set_attribute("fmserve.generation.finish_reason", generation.finish_reason)


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("the deadline expired before the generation finished")
    return left


def _since(started: float) -> float:
    return time.monotonic() - started
