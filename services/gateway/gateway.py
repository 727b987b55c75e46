"""The gateway's domain: answer an inference call from the cache where it can, from the
stages where it must, and keep the cache filled."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

from fmserve.core import context
from fmserve.core.tasks import TaskName
from fmserve.errors import InvalidInput
from fmserve.v1 import common_pb2
from services.gateway.cache_keys import cache_key, media_key
from services.gateway.media import Media
from services.gateway.outcomes import Outcomes
from services.gateway.pipeline import Input, Pipeline
from services.gateway.result_cache import ResultCache
from services.gateway.routes import Route, Router
from services.gateway.shadow import Shadow
from services.gateway.zero_shot import ZeroShot, check_labels


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
    media: list[Media] = field(default_factory=list)
    """Images, instead of texts."""
    candidate_labels: list[str] = field(default_factory=list)
    """Zero-shot labels for an image-embedding model's images; empty: the model.toml's."""


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
        self.zero_shot = ZeroShot(pipeline.stages.embed_texts)

    async def infer(self, call: InferCall) -> Answer:
        route = self._route(call)
        labels = self._zero_shot_labels(route, call)  # checked before any work is done
        inputs: Sequence[Input] = call.media or call.texts
        if not call.version and (copy := self.router.shadow(route)):
            self.shadow.mirror(copy, inputs)
        started = time.monotonic()
        try:
            answer = await self._answer(route, call, inputs, labels)
        except InvalidInput:
            raise  # the caller's mistake, not the version's
        except Exception:
            self.outcomes.record(route.model, route.version, False, time.monotonic() - started)
            raise
        self.outcomes.record(route.model, route.version, True, time.monotonic() - started)
        return answer

    async def _answer(
        self, route: Route, call: InferCall, inputs: Sequence[Input], labels: list[str]
    ) -> Answer:
        deadline = time.monotonic() + context.remaining_s(self.timeout_s)
        results = await self._results(route, inputs, call.cache_policy, deadline)
        if labels:
            config = self.router.repository.get(route.model)
            timeout = max(0.0, deadline - time.monotonic())
            results = await self.zero_shot.classify(
                route, config, labels, results, call.top_k, timeout
            )
            route = replace(route, task=TaskName.IMAGE_CLASSIFICATION)
        return Answer(route, results)

    def _route(self, call: InferCall) -> Route:
        if call.texts and call.media:
            raise InvalidInput("send texts or media, not both: one request, one kind of input")
        media = bool(call.media)
        # image-classification on an image-embedding model (CLIP) is zero-shot: the model
        # embeds the images, the gateway scores them against the labels.
        task = None if self._zero_shot_asked(call) else call.task
        route = self.router.route(
            call.model, call.version, task, call.truncate, call.top_k, call.routing_key, media
        )
        if media:
            self.router.check_media(call.media)
        else:
            self.router.check_texts(call.texts)
        return route

    def _zero_shot_asked(self, call: InferCall) -> bool:
        if call.candidate_labels:
            return True
        if call.task is not TaskName.IMAGE_CLASSIFICATION or not call.model:
            return False
        return self.router.repository.get(call.model).task is TaskName.IMAGE_EMBEDDING

    def _zero_shot_labels(self, route: Route, call: InferCall) -> list[str]:
        """The labels to classify images against, when zero-shot is asked of an image-embedding
        model (candidate labels, or the task image-classification): the request's, else the
        model.toml's."""
        if not self._zero_shot_asked(call):
            return []
        if route.task is not TaskName.IMAGE_EMBEDDING or not route.media:
            raise InvalidInput(
                "candidate_labels classify images (media) on an image-embedding model; model "
                f"{route.model!r} does {route.task.value}"
            )
        labels = call.candidate_labels or list(self.router.repository.get(route.model).labels)
        if not labels:
            raise InvalidInput(
                f"model {route.model!r} has no labels in its model.toml: send candidate_labels"
            )
        check_labels(labels)
        return labels

    async def _results(
        self, route: Route, inputs: Sequence[Input], policy: CachePolicy, deadline: float
    ) -> list[common_pb2.Result]:
        keys = [_key(route, input_) for input_ in inputs]
        results: list[common_pb2.Result | None] = [None] * len(keys)
        if policy is CachePolicy.USE:
            results = await self.cache.lookup(route.model, keys)
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            fresh = await self.pipeline.run(route, [inputs[i] for i in missing], deadline)
            for i, result in zip(missing, fresh, strict=True):
                results[i] = result
            if policy is not CachePolicy.BYPASS:
                self.cache.store([(keys[i], r) for i, r in zip(missing, fresh, strict=True)])
        return [r for r in results if r is not None]


def _key(route: Route, input_: Input) -> str:
    return cache_key(route, input_) if isinstance(input_, str) else media_key(route, input_)
