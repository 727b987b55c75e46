"""One loaded text-generation model version, as the registry holds it: its engine, its
scheduler and its statistics, with the lifecycle the registry expects of any instance."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from typing import Any

from transformers import DynamicCache

from fmserve.core.repository import ModelConfig
from fmserve.core.tasks import TaskName
from fmserve.errors import InvalidInput
from services.inference import warmup
from services.inference.generation.budget import KvBudget
from services.inference.generation.engine import Engine, Prompt
from services.inference.generation.params import GenerationRequest, check
from services.inference.generation.scheduler import Event, Scheduler
from services.inference.heap import HeapTrimmer
from services.inference.loading import LoadFailed, load_module, place
from services.inference.memory import Footprint, module_footprint
from services.inference.stats import ModelStats

WARMUP_ROW = -1
"""The decode batch's row id of the warm-up sequence (the scheduler numbers its own from 0)."""


def load_engine(config: ModelConfig, version: str, cuda_devices: int | None = None) -> Engine:
    """The causal LM of a version on its device (slow: run it in a thread)."""
    runtime = config.runtime_of(version)
    if runtime.backend != "torch":
        raise LoadFailed(
            f"text-generation runs on the torch backend only, not {runtime.backend}; "
            "onnxruntime serves embedding, text-classification and token-classification "
            'models: set [runtime] backend = "torch"'
        )
    placement = place(runtime, cuda_devices)
    module = load_module(config.files(version), TaskName.TEXT_GENERATION, placement)
    hf_config: Any = module.config
    if any(DynamicCache(config=hf_config).is_sliding):
        # its cache drops old entries itself, which the left-padded batch cannot follow
        raise LoadFailed(
            "models with sliding-window attention are not supported for generation yet"
        )
    return Engine(module, placement)


def eos_ids(module: Any) -> frozenset[int]:
    """The ids that end a generation: the model's generation config's and config's EOS."""
    found: set[int] = set()
    for source in (getattr(module, "generation_config", None), module.config):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            found.update([value] if isinstance(value, int) else value)
    return frozenset(found)


class GenerationInstance:
    def __init__(
        self,
        engine: Engine,
        config: ModelConfig,
        version: str,
        executor: Executor,
        heap: HeapTrimmer | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.version = version
        self.stats = ModelStats()
        self.last_used = time.monotonic()
        self._executor = executor
        generation = config.generation
        heap = heap or HeapTrimmer(0, executor)
        self.scheduler = Scheduler(
            engine,
            config.name,
            context=config.max_length,
            eos_ids=eos_ids(engine.module),
            budget=KvBudget(generation.max_batch_tokens, generation.max_sequences),
            max_wait_s=generation.max_wait_s,
            executor=executor,
            stats=self.stats,
            working=heap.working,
            max_prefill_tokens=generation.max_prefill_tokens,
            prefix_cache_tokens=generation.prefix_cache_tokens,
        )
        self._streams = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.scheduler.start()

    @property
    def idle(self) -> bool:
        return self._streams == 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Tokens as they are generated, then the finish; bad parameters are InvalidInput."""
        checked = check(request, self.config, self.engine.vocab_size)
        self.last_used = time.monotonic()
        self._streams += 1
        self._idle.clear()
        try:
            async for event in self.scheduler.generate(checked):
                yield event
        finally:
            self._streams -= 1
            if self._streams == 0:
                self._idle.set()

    async def infer(self, request: object) -> Any:
        raise InvalidInput(
            f"model {self.config.name!r} generates text: call ModelStreamInfer, which streams "
            "its tokens, not ModelInfer"
        )

    def footprint(self) -> Footprint:
        """The memory its weights take (memory.py); the KV cache is bounded apart."""
        return module_footprint(self.engine.module, self.engine.placement.device)

    async def warm_up(self) -> None:
        """Prefill a short prompt and decode a few steps before the version serves (no request
        reaches it before it is READY, so the decode batch is free)."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._warm_up)

    def _warm_up(self) -> None:
        ids = warmup.prompt(self.config, self.engine.vocab_size)
        prefilled = self.engine.prefill([Prompt(tuple(ids))])
        batch = self.engine.batch
        batch.add([WARMUP_ROW], prefilled.layers, prefilled.lengths)
        try:
            token = ids[-1]
            for _ in range(warmup.DECODE_STEPS):
                token = int(self.engine.decode([token]).logits[0].argmax())
        finally:
            batch.remove([WARMUP_ROW])

    async def close(self, grace_s: float) -> None:
        """Let streams in progress finish (up to `grace_s`), then end the rest: "cancelled"
        with the tokens they have, UNAVAILABLE for those that have none yet."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        await self.scheduler.stop()
