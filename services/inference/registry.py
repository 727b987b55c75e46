"""The registry owns the loaded model versions and their lifecycle.

- Lazy: a version loads on its first request; concurrent first requests share one load.
- Explicit: `load` / `unload` one version or a model (RepositoryModelLoad / RepositoryModelUnload);
  a version loaded with `pin` is never unloaded to make room or for idleness.
- Per version: each version is its own instance, and loading one never disturbs another.
  Requests that name no version go to the default (highest) version once it is ready, and until
  then to the newest version that is, while the default loads beside it.
- States (State): LOADING → WARMING (warm-up batches, warmup.py) → READY, or FAILED with the
  reason; UNLOADING while its requests in progress finish. Only a READY version serves.
- Room (residency.py): at most `max_loaded_models` versions and, with a memory budget, at most
  that many bytes of weights (memory.py: estimated from the files before a load, measured
  after); one more first unloads the least recently used idle versions, or is refused with
  RESOURCE_EXHAUSTED saying what holds the room. Versions unused for `idle_unload_s` (the
  model's `[lifecycle]`, else the service's) unload by themselves.
- A failed load is remembered with its reason (UNAVAILABLE), retried after `RETRY_FAILED_S` on
  use, or at once on an explicit load.

Each version has a thread of its own (`compute_threads`; one per `[runtime] instances`) where
its weights load and its batches run; the event loop keeps serving.
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
from fmserve.errors import (
    ConfigError,
    FmserveError,
    ModelNotFound,
    Unavailable,
    WrongTask,
)
from services.inference import memory, metrics, residency
from services.inference.audio_runner import AudioRunner
from services.inference.generation.instance import GenerationInstance, load_engine
from services.inference.heap import HeapTrimmer
from services.inference.instance import ModelInstance
from services.inference.loading import LoadFailed
from services.inference.memory import Footprint
from services.inference.residency import Key, Limits, Resident
from services.inference.runner import Runner
from services.inference.stats import ModelStats

log = logging.getLogger("fmserve.inference.registry")

RETRY_FAILED_S = 30.0
"""A version that failed to load is tried again on use after this long (a fixed file, a GPU
freed); until then its requests fail at once with the reason."""
DRAIN_MARGIN_S = 1.0
"""Time left, at most (half the grace when it is short), for the "cancelled" final messages of
generation streams to reach their callers before the server cuts the calls."""
SWEEP_S = 0.25
"""How often versions are checked for idleness, and for folders removed from the repository."""

Instance = ModelInstance | GenerationInstance


class State(StrEnum):
    """A version's state: Triton's words where it has them (tools check "READY")."""

    LOADING = "LOADING"
    """Its weights are loading."""
    WARMING = "WARMING"
    """Loaded; running its warm-up batches. It serves no request yet."""
    READY = "READY"
    """Serving."""
    UNLOADING = "UNLOADING"
    """Its requests in progress finish, then it is gone."""
    FAILED = "FAILED"
    """Its load or warm-up failed; the reason says why. Tried again on use after a while."""
    UNAVAILABLE = "UNAVAILABLE"
    """Not loaded: not yet, or unloaded (the reason says why); loads on its next request."""


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: State
    reason: str = ""


@dataclass(frozen=True)
class VersionStats:
    """A loaded version's statistics and the memory it takes."""

    name: str
    version: str
    stats: ModelStats
    footprint: Footprint | None = None


HOLDING = (State.LOADING, State.WARMING, State.READY)
"""States in which a version takes (or is about to take) its room."""


def compute_threads(instances: int = 1) -> ThreadPoolExecutor:
    """A version's compute thread: its weights load and its forward passes run there. One
    thread for both matters: with MiniLM loaded on another thread than the one running it, one
    sentence's forward pass took 11-13 ms instead of 7 (bf16, 2 cores; bench/ and README,
    "Performance"). A version with `[runtime] instances` > 1 asked for that many forward
    passes at once, so it gets that many threads."""
    return ThreadPoolExecutor(instances, thread_name_prefix="compute")


@dataclass
class _Slot:
    """One model version from the start of its load to its unload."""

    state: State = State.LOADING
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    """The load; held so that it is not garbage-collected while it runs."""
    instance: Instance | None = None
    """Set once READY."""
    reason: str = ""
    """Why the load failed; empty while loading or ready."""
    failed_at: float = 0.0
    bytes: int = 0
    """The weights' size: estimated from the files until loaded, then measured."""
    footprint: Footprint | None = None
    pinned: bool = False
    compute: ThreadPoolExecutor = field(default_factory=compute_threads)
    """The version's own thread(s): its load, warm-up and every forward pass run there."""

    def fail(self, reason: str) -> None:
        self.state, self.reason, self.failed_at = State.FAILED, reason, time.monotonic()

    @property
    def stale(self) -> bool:
        failed_long_ago = time.monotonic() - self.failed_at > RETRY_FAILED_S
        return self.state is State.FAILED and failed_long_ago

    @property
    def evictable(self) -> bool:
        idle = self.instance is not None and self.instance.idle
        return self.state is State.READY and idle and not self.pinned


class ModelRegistry:
    """Loads, serves and unloads model versions; a Resource of the inference service."""

    def __init__(
        self,
        repository: ModelRepository,
        max_loaded_models: int = 8,
        preload: Sequence[str] = (),
        grace_s: float = 10.0,
        heap_trim_idle_s: float = 0.0,
        memory_budget_mb: float = 0.0,
        idle_unload_s: float = 0.0,
    ) -> None:
        self.repository = repository
        self.limits = Limits(max_loaded_models, int(memory_budget_mb * residency.MB))
        self.idle_unload_s = idle_unload_s
        self._preload = list(preload)
        self._grace_s = grace_s
        self._slots: dict[Key, _Slot] = {}
        self._closing: dict[Key, _Slot] = {}
        self._unloaded: dict[Key, str] = {}
        """Why a version that was loaded is no longer."""
        # Trims run off the event loop, beside the versions' own compute threads.
        self._housekeeping = ThreadPoolExecutor(1, thread_name_prefix="heap-trim")
        self._heap = HeapTrimmer(heap_trim_idle_s, self._housekeeping)
        self._sweeper: asyncio.Task[None] | None = None
        self.ready = False

    async def start(self) -> None:
        """Load the preloaded models; one that fails is logged and reported, not fatal."""
        for name in self._preload:
            try:
                await self.load(name)
            except Unavailable as exc:
                log.error("preload failed", extra={"model": name, "reason": exc.message})
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        self.ready = True

    async def stop(self) -> None:
        """Stop every instance's batcher; the servers' calls have drained before this."""
        self.ready = False
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self._heap.stop()
        slots = [(key, self._begin_unload(key, "unloaded")) for key in list(self._slots)]
        await asyncio.gather(*(self._close(key, slot, 0.0) for key, slot in slots))
        self._housekeeping.shutdown(wait=False, cancel_futures=True)

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

    async def load(self, name: str, version: str = "", pin: bool = False) -> None:
        """Load a version (the default one when none is named) now, again if it failed before,
        and wait until it is READY. `pin`: never unload it to make room or for idleness."""
        config = self.config(name)
        version = config.resolve_version(version)
        await self._ensure(config, version, retry=True, pin=pin)

    async def unload(self, name: str, version: str = "") -> None:
        """Unload one version (unpinning it), or every version of a model, once its requests in
        progress are answered."""
        config = self.config(name)
        if version and (name, version) not in self._slots:
            config.resolve_version(version)  # NOT_FOUND for a version that does not exist
        keys = [k for k in self._slots if k[0] == name and (not version or k[1] == version)]
        slots = [(key, self._begin_unload(key, "unloaded")) for key in keys]
        await asyncio.gather(*(self._close(k, s, self._grace_s) for k, s in slots))

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

    def statistics(self, name: str = "", version: str = "") -> list[VersionStats]:
        """Statistics of the loaded versions (of one model, or one version); a named model that
        is not loaded reports zeros, as load generators ask before their first request."""
        if not name:
            return self._loaded()
        config = self.config(name)
        version = config.resolve_version(version) if version else ""
        found = [s for s in self._loaded() if s.name == name]
        found = [s for s in found if not version or s.version == version]
        return found or [VersionStats(name, version or config.default_version, ModelStats())]

    def _loaded(self) -> list[VersionStats]:
        loaded = [
            VersionStats(name, version, slot.instance.stats, slot.footprint)
            for (name, version), slot in self._slots.items()
            if slot.instance is not None
        ]
        return sorted(loaded, key=lambda s: (s.name, s.version))

    def _state(self, name: str, version: str) -> State | None:
        slot = self._slots.get((name, version))
        return slot.state if slot else None

    def _entry(self, name: str, version: str) -> IndexEntry:
        key = (name, version)
        if (slot := self._slots.get(key)) is not None:
            return IndexEntry(name, version, slot.state, slot.reason)
        if key in self._closing:
            return IndexEntry(name, version, State.UNLOADING, self._unloaded.get(key, ""))
        reason = self._unloaded.get(key, "not loaded; loads on first request")
        return IndexEntry(name, version, State.UNAVAILABLE, reason)

    def _publish(self, key: Key) -> None:
        """The version's state (and memory) as metrics, from what `index` would say."""
        name, version = key
        current = self._entry(name, version).state
        for state in State:
            metrics.MODEL_STATE.labels(name, version, state).set(int(state is current))
        slot = self._slots.get(key)
        if slot is not None and slot.instance is not None and slot.footprint is not None:
            metrics.MODEL_MEMORY.labels(name, version).set(slot.footprint.bytes)
        elif key not in self._closing:
            with contextlib.suppress(KeyError):
                metrics.MODEL_MEMORY.remove(name, version)

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
            with contextlib.suppress(FmserveError):
                self._start_load(config, default)
        return max(ready, key=version_order)

    async def _ensure(
        self, config: ModelConfig, version: str, retry: bool = False, pin: bool = False
    ) -> Instance:
        slot = self._slots.get((config.name, version))
        if slot is None or slot.stale or (retry and slot.state is State.FAILED):
            slot = self._start_load(config, version, pin or bool(slot and slot.pinned))
        slot.pinned = slot.pinned or pin
        await slot.done.wait()
        if slot.instance is None:
            raise Unavailable(slot.reason)
        slot.instance.last_used = time.monotonic()
        return slot.instance

    def _start_load(self, config: ModelConfig, version: str, pinned: bool = False) -> _Slot:
        """Claim the version's slot now (so concurrent requests share it), load in a task."""
        key = (config.name, version)
        need = memory.estimate(config, version)
        victims = self._make_room(key, need, f"model {config.name!r} version {version!r}")
        instances = config.runtime_of(version).instances
        slot = _Slot(bytes=need, pinned=pinned, compute=compute_threads(instances))
        self._slots[key] = slot
        self._unloaded.pop(key, None)
        self._publish(key)
        slot.task = asyncio.get_running_loop().create_task(
            self._load(config, version, slot, victims)
        )
        return slot

    def _make_room(self, key: Key, need: int, what: str) -> list[tuple[Key, _Slot]]:
        """Take the least recently used idle versions out, enough to stay within the limits."""
        residents = [
            Resident(k, s.bytes, s.instance.last_used if s.instance else 0.0, s.evictable)
            for k, s in self._slots.items()
            if k != key and s.state in HOLDING
        ]
        chosen = residency.victims(residents, need, self.limits, what)
        reason = f"evicted to make room for {what}"
        return [(victim, self._begin_unload(victim, reason)) for victim in chosen]

    def _begin_unload(self, key: Key, reason: str) -> _Slot:
        slot = self._slots.pop(key)
        self._closing[key] = slot
        self._unloaded[key] = reason
        self._publish(key)
        return slot

    async def _load(
        self, config: ModelConfig, version: str, slot: _Slot, victims: list[tuple[Key, _Slot]]
    ) -> None:
        key = (config.name, version)
        what = f"model {config.name!r} version {version!r}"
        try:
            await asyncio.gather(*(self._close(k, v, self._grace_s, "evicted") for k, v in victims))
            instance = await self._instance(config, version, slot.compute)
            slot.footprint = instance.footprint()
            slot.bytes = slot.footprint.bytes
            slot.state = State.WARMING
            self._publish(key)
            await self._warm_up(instance, what)
            slot.instance, slot.state = instance, State.READY
            self._record(config.name, version, "loaded")
            await self._settle(key, slot, what)
        except LoadFailed as exc:
            slot.fail(f"{what} failed to load: {exc.message}")
            self._record(config.name, version, "failed", slot.reason)
        except Exception:
            log.exception("loading %s failed", what)
            slot.fail(f"{what} failed to load; the inference service's log has the details")
            self._record(config.name, version, "failed")
        finally:
            if slot.state is State.FAILED:
                slot.compute.shutdown(wait=False)
            slot.done.set()
            self._publish(key)

    async def _warm_up(self, instance: Instance, what: str) -> None:
        """Run the warm-up; one that fails closes the instance: the version never serves."""
        started = time.perf_counter()
        try:
            await instance.warm_up()
        except Exception as exc:
            await instance.close(0.0)
            log.exception("the warm-up of %s failed", what)
            cause = exc.message if isinstance(exc, FmserveError) else type(exc).__name__
            raise LoadFailed(f"its warm-up failed ({cause}); it serves no traffic") from exc
        metrics.WARMUP_DURATION.labels(instance.config.name).observe(time.perf_counter() - started)

    async def _settle(self, key: Key, slot: _Slot, what: str) -> None:
        """A version measured larger than its files said: unload idle ones to stay within the
        budget; past it when none can go (logged), rather than fail a version that loaded."""
        if self._slots.get(key) is not slot:
            return  # unloaded while it loaded
        others = [
            Resident(k, s.bytes, s.instance.last_used if s.instance else 0.0, s.evictable)
            for k, s in self._slots.items()
            if k != key and s.state in HOLDING
        ]
        try:
            chosen = residency.victims(others, slot.bytes, self.limits, what)
        except FmserveError as exc:
            log.warning("over the memory budget: %s", exc.message)
            return
        victims = [(k, self._begin_unload(k, f"evicted to make room for {what}")) for k in chosen]
        await asyncio.gather(*(self._close(k, v, self._grace_s, "evicted") for k, v in victims))

    async def _instance(
        self, config: ModelConfig, version: str, compute: ThreadPoolExecutor
    ) -> Instance:
        """Load the weights on the version's compute thread; the instance (its batcher or
        scheduler) on the loop."""
        loop = asyncio.get_running_loop()
        if config.task is TaskName.TEXT_GENERATION:
            engine = await loop.run_in_executor(compute, load_engine, config, version)
            return GenerationInstance(engine, config, version, compute, self._heap)
        runner: Runner | AudioRunner
        if config.task.takes_audio:
            runner = await loop.run_in_executor(compute, AudioRunner.load, config, version)
        else:
            runner = await loop.run_in_executor(compute, Runner.load, config, version)
        return ModelInstance(runner, version, compute, self._heap)

    async def _close(self, key: Key, slot: _Slot, grace_s: float, event: str = "unloaded") -> None:
        try:
            await slot.done.wait()  # unloading a version that is still loading waits for the load
            if slot.instance is not None:
                await slot.instance.close(grace_s)
                self._record(*key, event)
            slot.compute.shutdown(wait=False)  # the thread ends once its last batch has
        finally:
            if self._closing.get(key) is slot:
                del self._closing[key]
            self._publish(key)

    async def _sweep(self) -> None:
        """Unload versions idle past their idle_unload_s, and those whose folder is gone."""
        while True:
            await asyncio.sleep(SWEEP_S)
            try:
                now = time.monotonic()
                due = [(k, why) for k, s in self._slots.items() if (why := self._due(k, s, now))]
                slots = [(key, self._begin_unload(key, why)) for key, why in due]
                await asyncio.gather(*(self._close(k, s, self._grace_s) for k, s in slots))
            except Exception:  # one bad sweep must not end the sweeping
                log.exception("unloading idle versions failed; trying again")

    def _due(self, key: Key, slot: _Slot, now: float) -> str:
        """Why the version should unload now ("" if it should not)."""
        if not slot.evictable:
            return ""
        try:
            config = self.repository.get(key[0])
        except ModelNotFound:
            return "its model was removed from the repository"
        except ConfigError:
            return ""  # a model.toml being edited: keep what serves
        if key[1] not in config.versions:
            return "its version folder was removed from the repository"
        idle_s = config.lifecycle.idle_unload_s
        idle_s = self.idle_unload_s if idle_s is None else idle_s
        assert slot.instance is not None  # evictable
        if idle_s and now - slot.instance.last_used >= idle_s:
            return f"unloaded after {idle_s:g} s unused"
        return ""

    def _record(self, name: str, version: str, event: str, reason: str = "") -> None:
        metrics.MODEL_LOADS.labels(name, event).inc()
        extra = {"model": name, "version": version, "event": event}
        if reason:
            log.warning("model %s", event, extra={**extra, "reason": reason})
        else:
            log.info("model %s", event, extra=extra)
