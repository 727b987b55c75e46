"""The registry owns the loaded model versions.

- Lazy: a version loads on its first request; concurrent first requests share one load.
- Explicit: `load` / `unload` by name (RepositoryModelLoad / RepositoryModelUnload).
- Per version: each version is its own instance, and loading one never disturbs another.
  Requests that name no version go to the default (highest) version once it is ready, and until
  then to the newest version that is, while the default loads beside it.
- Budget: at most `max_loaded_models` versions; one more first unloads the least recently used
  idle version, or is refused with RESOURCE_EXHAUSTED while every loaded version is busy.
- A failed load is remembered with its reason (UNAVAILABLE), retried after `RETRY_FAILED_S` on
  use, or at once on an explicit load.

Weights load in a thread and batches run in the compute executor; the event loop keeps serving.
Once every version's batches pause, the heap they freed goes back to the OS (heap.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum

from fmserve.core.repository import ModelConfig, ModelRepository, version_order
from fmserve.core.tasks import TaskName
from fmserve.errors import ConfigError, Overloaded, Unavailable, WrongTask
from services.inference import metrics
from services.inference.audio_runner import AudioRunner
from services.inference.generation.instance import GenerationInstance, load_engine
from services.inference.heap import HeapTrimmer
from services.inference.instance import ModelInstance
from services.inference.loading import LoadFailed
from services.inference.runner import Runner
from services.inference.stats import ModelStats

log = logging.getLogger("fmserve.inference.registry")

RETRY_FAILED_S = 30.0
DRAIN_MARGIN_S = 1.0
"""Time left, at most (half the grace when it is short), for the "cancelled" final messages of
generation streams to reach their callers before the server cuts the calls."""
"""A version that failed to load is tried again on use after this long (a fixed file, a GPU
freed); until then its requests fail at once with the reason."""

Key = tuple[str, str]  # (model name, version)
Instance = ModelInstance | GenerationInstance


class State(StrEnum):
    """A version's state, in Triton's words."""

    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: State
    reason: str = ""


@dataclass
class _Slot:
    """One model version from the start of its load to its unload."""

    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    """The load; held so that it is not garbage-collected while it runs."""
    instance: Instance | None = None
    reason: str = ""
    """Why the load failed; empty while loading or ready."""
    failed_at: float = 0.0

    @property
    def state(self) -> State:
        if self.instance is not None:
            return State.READY
        return State.UNAVAILABLE if self.reason else State.LOADING

    def fail(self, reason: str) -> None:
        self.reason, self.failed_at = reason, time.monotonic()

    @property
    def stale(self) -> bool:
        return bool(self.reason) and time.monotonic() - self.failed_at > RETRY_FAILED_S


class ModelRegistry:
    """Loads, serves and unloads model versions; a Resource of the inference service."""

    def __init__(
        self,
        repository: ModelRepository,
        max_loaded_models: int = 8,
        preload: Sequence[str] = (),
        grace_s: float = 10.0,
        heap_trim_idle_s: float = 0.0,
    ) -> None:
        self.repository = repository
        self.max_loaded_models = max_loaded_models
        self._preload = list(preload)
        self._grace_s = grace_s
        self._slots: dict[Key, _Slot] = {}
        self._unloaded: set[Key] = set()
        # Each instance runs one batch at a time, so one thread per loadable version suffices.
        self._compute = ThreadPoolExecutor(max_loaded_models, thread_name_prefix="inference")
        self._heap = HeapTrimmer(heap_trim_idle_s, self._compute)
        self.ready = False

    async def start(self) -> None:
        """Load the preloaded models; one that fails is logged and reported, not fatal."""
        for name in self._preload:
            try:
                await self.load(name)
            except Unavailable as exc:
                log.error("preload failed", extra={"model": name, "reason": exc.message})
        self.ready = True

    async def stop(self) -> None:
        """Stop every instance's batcher; the servers' calls have drained before this."""
        self.ready = False
        self._heap.stop()
        slots, self._slots = list(self._slots.items()), {}
        await asyncio.gather(*(self._close(key, slot, "unloaded", 0.0) for key, slot in slots))
        self._compute.shutdown(wait=False, cancel_futures=True)

    async def drain(self, grace_s: float) -> None:
        """The service is stopping: generation streams still running shortly before the grace
        ends are ended "cancelled", with their tokens so far, while their final message can
        still reach the caller (the server cuts what is left at the end of the grace)."""
        await asyncio.sleep(max(0.0, grace_s - min(DRAIN_MARGIN_S, grace_s / 2)))
        instances = [s.instance for s in self._slots.values()]
        await asyncio.gather(
            *(i.scheduler.stop() for i in instances if isinstance(i, GenerationInstance))
        )

    def config(self, name: str) -> ModelConfig:
        """A model's config; ModelNotFound for unknown names, ConfigError for broken configs."""
        return self.repository.get(name)

    async def instance(self, name: str, version: str = "") -> Instance:
        """The instance serving a request, loading it on first use."""
        config = self.config(name)
        version = config.resolve_version(version) if version else self._serving_version(config)
        return await self._ensure(config, version)

    async def generator(self, name: str, version: str = "") -> GenerationInstance:
        """The instance of a text-generation model; WrongTask for any other model."""
        config = self.config(name)
        if config.task is not TaskName.TEXT_GENERATION:
            raise WrongTask(
                f"model {name!r} is a {config.task} model and generates no text; use ModelInfer"
            )
        instance = await self.instance(name, version)
        assert isinstance(instance, GenerationInstance)
        return instance

    async def load(self, name: str) -> None:
        """Load a model's default version now (again, if it failed before)."""
        config = self.config(name)
        await self._ensure(config, config.default_version, retry=True)

    async def unload(self, name: str) -> None:
        """Unload every version of a model once its requests in progress are answered."""
        self.config(name)
        keys = [key for key in self._slots if key[0] == name]
        slots = [(key, self._slots.pop(key)) for key in keys]
        self._unloaded.update(keys)
        await asyncio.gather(*(self._close(k, s, "unloaded", self._grace_s) for k, s in slots))

    def is_ready(self, name: str, version: str = "") -> bool:
        """Whether the version (any version, when none is named) can answer without loading."""
        config = self.config(name)
        if version:
            return self._state(name, config.resolve_version(version)) is State.READY
        return any(self._state(name, v) is State.READY for v in config.versions)

    def index(self) -> list[IndexEntry]:
        """Every version of every model in the repository, with its state and reason."""
        entries = []
        for name in self.repository.names():
            try:
                config = self.repository.get(name)
            except ConfigError as exc:
                entries.append(IndexEntry(name, "", State.UNAVAILABLE, exc.message))
                continue
            entries.extend(self._entry(name, v) for v in sorted(config.versions, key=version_order))
        return entries

    def statistics(self, name: str = "", version: str = "") -> list[tuple[str, str, ModelStats]]:
        """Statistics of the loaded versions (of one model, or one version); a named model that
        is not loaded reports zeros, as load generators ask before their first request."""
        if not name:
            return [(n, v, instance.stats) for (n, v), instance in self._loaded()]
        config = self.config(name)
        version = config.resolve_version(version) if version else ""
        found = [(n, v, instance.stats) for (n, v), instance in self._loaded() if n == name]
        found = [entry for entry in found if not version or entry[1] == version]
        return found or [(name, version or config.default_version, ModelStats())]

    def _loaded(self) -> list[tuple[Key, Instance]]:
        loaded = [(k, s.instance) for k, s in self._slots.items() if s.instance is not None]
        return sorted(loaded, key=lambda entry: entry[0])

    def _state(self, name: str, version: str) -> State | None:
        slot = self._slots.get((name, version))
        return slot.state if slot else None

    def _entry(self, name: str, version: str) -> IndexEntry:
        slot = self._slots.get((name, version))
        if slot is not None:
            return IndexEntry(name, version, slot.state, slot.reason)
        unloaded = (name, version) in self._unloaded
        reason = "unloaded" if unloaded else "not loaded; loads on first request"
        return IndexEntry(name, version, State.UNAVAILABLE, reason)

    def _serving_version(self, config: ModelConfig) -> str:
        """The default version when it is ready; else the newest ready one while the default
        loads beside it; else the default (the request waits for its load)."""
        default = config.default_version
        ready = [v for v in config.versions if self._state(config.name, v) is State.READY]
        if not ready or default in ready:
            return default
        slot = self._slots.get((config.name, default))
        if slot is None or slot.stale:
            # no room for the new version yet (Overloaded): keep serving the old one
            with contextlib.suppress(Overloaded):
                self._start_load(config, default)
        return max(ready, key=version_order)

    async def _ensure(self, config: ModelConfig, version: str, retry: bool = False) -> Instance:
        slot = self._slots.get((config.name, version))
        if slot is None or slot.stale or (retry and slot.reason):
            slot = self._start_load(config, version)
        await slot.done.wait()
        if slot.instance is None:
            raise Unavailable(slot.reason)
        slot.instance.last_used = time.monotonic()
        return slot.instance

    def _start_load(self, config: ModelConfig, version: str) -> _Slot:
        """Claim the version's slot now (so concurrent requests share it), load in a task."""
        key = (config.name, version)
        victims = self._make_room(key)
        slot = _Slot()
        self._slots[key] = slot
        self._unloaded.discard(key)
        loading = self._load(config, version, slot, victims)
        slot.task = asyncio.get_running_loop().create_task(loading)
        return slot

    def _make_room(self, key: Key) -> list[tuple[Key, _Slot]]:
        """Take the least recently used idle versions out, enough to stay within the budget."""
        held = [(k, s) for k, s in self._slots.items() if k != key and s.state != State.UNAVAILABLE]
        excess = len(held) + 1 - self.max_loaded_models
        if excess <= 0:
            return []
        idle = sorted((s.instance.last_used, k) for k, s in held if s.instance and s.instance.idle)
        if len(idle) < excess:
            raise Overloaded(
                f"{len(held)} model versions are loaded and all busy; retry shortly "
                "(or raise FMSERVE_INFERENCE_MAX_LOADED_MODELS)"
            )
        victims = [k for _, k in idle[:excess]]
        self._unloaded.update(victims)
        return [(k, self._slots.pop(k)) for k in victims]

    async def _load(
        self, config: ModelConfig, version: str, slot: _Slot, victims: list[tuple[Key, _Slot]]
    ) -> None:
        what = f"model {config.name!r} version {version!r}"
        try:
            for key, victim in victims:
                await self._close(key, victim, "evicted", self._grace_s)
            slot.instance = await self._instance(config, version)
            self._record(config.name, version, "loaded")
        except LoadFailed as exc:
            slot.fail(f"{what} failed to load: {exc.message}")
            self._record(config.name, version, "failed", slot.reason)
        except Exception:
            log.exception("loading %s failed", what)
            slot.fail(f"{what} failed to load; the inference service's log has the details")
            self._record(config.name, version, "failed")
        finally:
            slot.done.set()

    async def _instance(self, config: ModelConfig, version: str) -> Instance:
        """Load the weights in a thread; the instance (its batcher or scheduler) on the loop."""
        if config.task is TaskName.TEXT_GENERATION:
            engine = await asyncio.to_thread(load_engine, config, version)
            return GenerationInstance(engine, config, version, self._compute, self._heap)
        runner: Runner | AudioRunner
        if config.task.takes_audio:
            runner = await asyncio.to_thread(AudioRunner.load, config, version)
        else:
            runner = await asyncio.to_thread(Runner.load, config, version)
        return ModelInstance(runner, version, self._compute, self._heap)

    async def _close(self, key: Key, slot: _Slot, event: str, grace_s: float) -> None:
        await slot.done.wait()  # unloading a version that is still loading waits for the load
        if slot.instance is not None:
            await slot.instance.close(grace_s)
            self._record(*key, event)

    def _record(self, name: str, version: str, event: str, reason: str = "") -> None:
        metrics.MODEL_LOADS.labels(name, event).inc()
        extra = {"model": name, "version": version, "event": event}
        if reason:
            log.warning("model %s", event, extra={**extra, "reason": reason})
        else:
            log.info("model %s", event, extra=extra)
