"""The gateway's domain: answer an inference call from the cache where it can, from the
stages where it must, and keep the cache filled."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from fmserve.core import context
from fmserve.core.tasks import TaskName
from fmserve.errors import InvalidInput
from fmserve.v1 import common_pb2
from services.gateway.cache_keys import cache_key
from services.gateway.outcomes import Outcomes
from services.gateway.pipeline import Pipeline
from services.gateway.result_cache import ResultCache
from services.gateway.routes import Route, Router
from services.gateway.shadow import Shadow


class CachePolicy(Enum):
    USE = "use"
    BYPASS = "bypass"
    REFRESH = "refresh"


@dataclass
class InferCall:
    model: str
    texts: list[str]
    version: str = ""
    task: TaskName | None = None
    truncate: bool = False
    top_k: int = 0
    cache_policy: CachePolicy = CachePolicy.USE
    routing_key: str = ""


@dataclass
class Answer:
    route: Route
    results: list[common_pb2.Result] = field(default_factory=list)

    @property
    def cache_hit(self) -> bool:
        return all(r.cached for r in self.results)


class Gateway:
    def __init__(
        self,
        router: Router,
        pipeline: Pipeline,
        cache: ResultCache,
        timeout_s: float,
        outcomes: Outcomes,
        shadow: Shadow,
    ):
        self.router = router
        self.pipeline = pipeline
        self.cache = cache
        self.timeout_s = timeout_s
        self.outcomes = outcomes
        self.shadow = shadow

    async def infer(self, call: InferCall) -> Answer:
        route = self.router.route(
            call.model, call.version, call.task, call.truncate, call.top_k, call.routing_key
        )
        self.router.check_texts(call.texts)
        if not call.version and (copy := self.router.shadow(route)):
            self.shadow.mirror(copy, call.texts)
        started = time.monotonic()
        try:
            answer = await self._answer(route, call)
        except InvalidInput:
            raise  # the caller's mistake, not the version's
        except Exception:
            self.outcomes.record(route.model, route.version, False, time.monotonic() - started)
            raise
        self.outcomes.record(route.model, route.version, True, time.monotonic() - started)
        return answer

    async def _answer(self, route: Route, call: InferCall) -> Answer:
        keys = [cache_key(route, text) for text in call.texts]
        results: list[common_pb2.Result | None] = [None] * len(keys)
        if call.cache_policy is CachePolicy.USE:
            results = await self.cache.lookup(route.model, keys)
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            deadline = time.monotonic() + context.remaining_s(self.timeout_s)
            fresh = await self.pipeline.run(route, [call.texts[i] for i in missing], deadline)
            for i, result in zip(missing, fresh, strict=True):
                results[i] = result
            if call.cache_policy is not CachePolicy.BYPASS:
                self.cache.store([(keys[i], r) for i, r in zip(missing, fresh, strict=True)])
        return Answer(route, [r for r in results if r is not None])
