"""Where a version's work runs: its weights load, its warm-up and every batch run on one thread
of its own (registry.compute_threads), since the same forward pass ran 1.5-2x slower on
another thread than the one that loaded the weights; and the thread ends with the version."""

from __future__ import annotations

import threading
from collections import defaultdict
from pathlib import Path

import pytest
import tritonclient.grpc.aio as triton

from services.inference.registry import ModelRegistry
from services.inference.runner import Runner
from tests.integration.test_inference_service import ragged, start
from tests.models import build_classifier

pytestmark = pytest.mark.timeout(120)


async def test_each_version_loads_warms_and_runs_on_one_thread_of_its_own(
    model_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, set[threading.Thread]] = defaultdict(set)
    load, forward = Runner.load.__func__, Runner.forward  # type: ignore[attr-defined]

    def recorded_load(cls, config, version, *args):  # type: ignore[no-untyped-def]
        seen[config.name].add(threading.current_thread())
        return load(cls, config, version, *args)

    def recorded_forward(self, sequences):  # type: ignore[no-untyped-def]
        seen[self.config.name].add(threading.current_thread())
        return forward(self, sequences)

    monkeypatch.setattr(Runner, "load", classmethod(recorded_load))
    monkeypatch.setattr(Runner, "forward", recorded_forward)
    service = await start(model_repository)
    try:
        async with triton.InferenceServerClient(f"127.0.0.1:{service.port}") as client:
            for model in ("tiny-classifier", "tiny-ner", "tiny-classifier"):
                await client.infer(model, ragged([[101, 2000, 2001, 102]] * 3))
            threads = {name: set(idents) for name, idents in seen.items()}
            await client.unload_model("tiny-ner")
    finally:
        await service.stop()

    assert len(threads["tiny-classifier"]) == 1 and len(threads["tiny-ner"]) == 1
    assert threads["tiny-classifier"] != threads["tiny-ner"]
    # The unloaded version's thread ends: its pool is shut down without waiting (it ends once
    # its last batch is done), so give it a moment, as the process itself would.
    for thread in threads["tiny-ner"]:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads["tiny-ner"])


async def test_a_version_with_several_instances_runs_that_many_batches_at_once(
    tmp_path: Path,
) -> None:
    build_classifier(tmp_path / "twice" / "1")
    (tmp_path / "twice" / "model.toml").write_text(
        'task = "text-classification"\n[runtime]\ninstances = 2\n[batching]\nmax_batch_size = 1\n'
    )
    service = await start(tmp_path)
    try:
        async with triton.InferenceServerClient(f"127.0.0.1:{service.port}") as client:
            await client.load_model("twice")
            registry = next(r for r in service.resources if isinstance(r, ModelRegistry))
            [slot] = registry._slots.values()
            assert slot.compute._max_workers == 2
    finally:
        await service.stop()
