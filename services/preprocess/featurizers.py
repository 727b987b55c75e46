"""The featurizers of the preprocess service: media items → a model's input tensors, by the
model's task (`LOADERS`: a task's featurizer plugs in with one line). One featurizer per
(model, version), loaded on first use from the model's files, once even when many first
requests arrive together; decoding and featurizing run in this module's worker threads, never
on the event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from fmserve.core.repository import ModelConfig, ModelRepository
from fmserve.core.tasks import TaskName
from fmserve.errors import ConfigError, InvalidInput, WrongTask
from services.preprocess.audio import AudioFeaturizer
from services.preprocess.image_features import ImageFeaturizer
from services.preprocess.media import MediaItem
from services.preprocess.metrics import FEATURIZED_ITEMS
from services.preprocess.settings import PreprocessSettings

log = logging.getLogger("fmserve.preprocess.featurizers")

T = TypeVar("T")


class Featurizer(Protocol):
    def __call__(self, items: Sequence[MediaItem]) -> dict[str, np.ndarray]:
        """The model's inputs by name, batch-first, one row per item in order; InvalidInput
        names the item at fault ("media[3] ...")."""
        ...


Loader = Callable[[ModelConfig, Path, PreprocessSettings], Featurizer]
"""Loads a model version's featurizer from its folder; ValueError or OSError say what its files
lack."""

LOADERS: dict[TaskName, Loader] = {
    TaskName.IMAGE_CLASSIFICATION: ImageFeaturizer.load,
    TaskName.IMAGE_EMBEDDING: ImageFeaturizer.load,
    TaskName.AUDIO_CLASSIFICATION: AudioFeaturizer.load,
    TaskName.SPEECH_RECOGNITION: AudioFeaturizer.load,
    TaskName.VOICE_ACTIVITY: AudioFeaturizer.load,
}


class Featurizers:
    """Owns the loaded featurizers and the threads that load and run them."""

    def __init__(self, repository: ModelRepository, settings: PreprocessSettings) -> None:
        self.repository = repository
        self.settings = settings
        self._executor = ThreadPoolExecutor(settings.media_threads, thread_name_prefix="media")
        # A load in progress is shared by every request that needs it; a failed one is dropped
        # so that the next request tries again.
        self._featurizers: dict[tuple[str, str], asyncio.Future[Featurizer]] = {}

    async def start(self) -> None:
        """Nothing to prepare: featurizers load on first use."""

    async def stop(self) -> None:
        """Called once calls have drained: drop queued work; a running one ends in its thread."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._featurizers.clear()

    async def featurize(
        self, model: str, version: str, items: Sequence[MediaItem]
    ) -> dict[str, np.ndarray]:
        """The items as `model`'s inputs at `version` ("" is the default version)."""
        config = self.repository.get(model)
        version = config.resolve_version(version)
        if not items:
            raise InvalidInput("media is empty; send at least one image or audio clip")
        featurizer = await self._get(config, version)
        inputs = await self._in_thread(partial(featurizer, items))
        FEATURIZED_ITEMS.labels(config.name).inc(len(items))
        return inputs

    async def _get(self, config: ModelConfig, version: str) -> Featurizer:
        loader = LOADERS.get(config.task)
        if loader is None:
            raise WrongTask(
                f"model {config.name!r} does {config.task.value}, which takes texts, not media"
            )
        key = (config.name, version)
        loading = self._featurizers.get(key)
        if loading is None:
            loading = asyncio.ensure_future(self._load(config, version, loader))
            loading.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._featurizers[key] = loading
        # A caller that gives up must not cancel a load that other callers wait for.
        return await asyncio.shield(loading)

    async def _load(self, config: ModelConfig, version: str, loader: Loader) -> Featurizer:
        try:
            folder = await self._in_thread(partial(config.files, version))
            return await self._in_thread(partial(loader, config, folder, self.settings))
        except (ValueError, OSError) as exc:
            self._featurizers.pop((config.name, version), None)
            log.error("featurizer load failed", extra={"model": config.name, "reason": str(exc)})
            raise ConfigError(
                f"model {config.name!r} version {version} cannot take media: {exc}"
            ) from None
        except BaseException:
            self._featurizers.pop((config.name, version), None)
            raise

    async def _in_thread(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)
