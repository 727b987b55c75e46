"""Zero-shot image classification on an image-embedding model (CLIP): each image's embedding
scored against the text embeddings of the candidate labels (each label put in the model's
`label_prompt`), times the model's logit scale, softmaxed over the labels, as CLIP's own
`logits_per_image` does.

Done here, after the result cache, rather than in a stage: the image embeddings are the ones
`embed_images` caches (one cache entry per image whatever labels are asked), a label set's
text embeddings are computed once through the same stages as any text (Tokenize, then the
model's text tower) and kept here per label set, and the scoring is one small matrix product.
The logit scale is a weight of the model: read once per version from its safetensors files,
which the gateway's model repository holds beside config.json."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import numpy as np
from safetensors import safe_open

from fmserve.core.repository import ModelConfig
from fmserve.errors import ConfigError, InvalidInput
from fmserve.v1 import common_pb2
from services.gateway.routes import Route

LOGIT_SCALE = "logit_scale"
MAX_LABELS = 1000

EmbedTexts = Callable[[Route, list[str], float], Awaitable[np.ndarray]]
"""The text embeddings [texts, D] of an image-embedding model through the stages, within a
timeout in seconds."""


class ZeroShot:
    """Owns the cached label embeddings (the last `max_label_sets` sets) and logit scales."""

    def __init__(self, embed_texts: EmbedTexts, max_label_sets: int = 256) -> None:
        self.embed_texts = embed_texts
        self.max_label_sets = max_label_sets
        self._labels: OrderedDict[tuple[Route, tuple[str, ...]], asyncio.Future[np.ndarray]] = (
            OrderedDict()
        )
        self._scales: dict[tuple[str, str], float] = {}

    async def classify(
        self,
        route: Route,
        config: ModelConfig,
        labels: Sequence[str],
        images: list[common_pb2.Result],
        top_k: int,
        timeout: float,
    ) -> list[common_pb2.Result]:
        """One classification per image embedding, best label first, cut to `top_k` (0: all);
        the labels as `check_labels` passed them."""
        texts = await self._label_embeddings(route, config, tuple(labels), timeout)
        scale = await self._scale(config, route.version)
        vectors = np.asarray([list(r.embedding.values) for r in images], dtype=np.float64)
        probs = _softmax(scale * vectors @ texts.T)
        return [
            _classification(row, labels, top_k, r.cached)
            for row, r in zip(probs, images, strict=True)
        ]

    async def _label_embeddings(
        self, route: Route, config: ModelConfig, labels: tuple[str, ...], timeout: float
    ) -> np.ndarray:
        key = (route, labels)
        future = self._labels.get(key)
        if future is None or (future.done() and (future.cancelled() or future.exception())):
            prompts = [config.label_prompt.format(label) for label in labels]
            future = asyncio.ensure_future(self.embed_texts(route, prompts, timeout))
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._labels[key] = future
            while len(self._labels) > self.max_label_sets:
                self._labels.popitem(last=False)
        self._labels.move_to_end(key)
        # A caller that gives up must not cancel the embedding others wait for.
        return (await asyncio.shield(future)).astype(np.float64)

    async def _scale(self, config: ModelConfig, version: str) -> float:
        key = (config.name, version)
        if key not in self._scales:
            files = await asyncio.to_thread(config.files, version)
            self._scales[key] = await asyncio.to_thread(logit_scale, files, config.name)
        return self._scales[key]


def check_labels(labels: Sequence[str]) -> None:
    """Candidate labels a classification can be made of: a bounded number, each named once."""
    if len(labels) > MAX_LABELS:
        raise InvalidInput(f"{len(labels)} candidate labels; the limit is {MAX_LABELS}")
    for index, label in enumerate(labels):
        if not label.strip():
            raise InvalidInput(f"candidate_labels[{index}] is empty: name each label")
    if len(set(labels)) != len(labels):
        raise InvalidInput("candidate_labels holds a label twice: name each label once")


def logit_scale(files: Path, model: str) -> float:
    """exp(logit_scale), the weight CLIP multiplies its cosine similarities by."""
    for path in sorted(files.glob("*.safetensors")):
        with safe_open(path, framework="numpy") as weights:
            if LOGIT_SCALE in weights.keys():  # noqa: SIM118 (safe_open has no __contains__)
                return float(np.exp(weights.get_tensor(LOGIT_SCALE)))
    raise ConfigError(
        f"model {model!r} has no {LOGIT_SCALE} weight: zero-shot labels need a CLIP-style model"
    )


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def _classification(
    probs: np.ndarray, labels: Sequence[str], top_k: int, cached: bool
) -> common_pb2.Result:
    order = np.argsort(-probs, kind="stable")
    order = order[:top_k] if top_k > 0 else order
    scores = [common_pb2.LabelScore(label=labels[i], score=float(probs[i])) for i in order]
    return common_pb2.Result(classification=common_pb2.Classification(labels=scores), cached=cached)
