"""The registry's lifecycle with real (tiny) models: lazy shared loads, per-version instances, a
new version loading beside the old, the memory budget, failed loads and unloads."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from fmserve.core.repository import ModelRepository
from fmserve.errors import InputTooLong, ModelNotFound, Unavailable
from services.inference.instance import InferRequest
from services.inference.registry import ModelRegistry, State
from tests.models import add_pickled_model

pytestmark = pytest.mark.timeout(60)
torch.set_num_threads(1)

SEQUENCE = np.array([101, 7592, 2088, 102], dtype=np.int64)


@asynccontextmanager
async def registry_of(root: Path, **options: int) -> AsyncIterator[ModelRegistry]:
    registry = ModelRegistry(ModelRepository(root), grace_s=1.0, **options)
    await registry.start()
    try:
        yield registry
    finally:
        await registry.stop()


def loads(model: str, event: str) -> float:
    labels = {"model": model, "event": event}
    return REGISTRY.get_sample_value("fmserve_inference_model_loads_total", labels) or 0.0


def states(registry: ModelRegistry, name: str) -> dict[str, State]:
    return {e.version: e.state for e in registry.index() if e.name == name}


def classifier_repository(source: Path, target: Path, versions: tuple[str, ...]) -> Path:
    for version in versions:
        shutil.copytree(source / "tiny-classifier" / version, target / "tiny-classifier" / version)
    shutil.copy(source / "tiny-classifier" / "model.toml", target / "tiny-classifier")
    return target


async def test_concurrent_first_requests_share_one_load(model_repository: Path) -> None:
    before = loads("tiny-ner", "loaded")
    async with registry_of(model_repository) as registry:
        assert not registry.is_ready("tiny-ner")
        instances = await asyncio.gather(*(registry.instance("tiny-ner") for _ in range(5)))
        assert len({id(i) for i in instances}) == 1
        assert registry.is_ready("tiny-ner", "1")
    assert loads("tiny-ner", "loaded") == before + 1


async def test_each_version_is_its_own_instance(model_repository: Path) -> None:
    async with registry_of(model_repository) as registry:
        one = await registry.instance("tiny-classifier", "1")
        two = await registry.instance("tiny-classifier", "2")
        assert (one.version, two.version) == ("1", "2")
        assert await registry.instance("tiny-classifier") is two  # the default version
        request = InferRequest("tiny-classifier", "", [SEQUENCE])
        logits_one = (await one.infer(request)).array
        logits_two = (await two.infer(request)).array
        assert logits_one.shape == logits_two.shape == (1, 3)
        assert not np.allclose(logits_one, logits_two)
        assert states(registry, "tiny-classifier") == {"1": State.READY, "2": State.READY}


async def test_new_version_loads_beside_the_old(model_repository: Path, tmp_path: Path) -> None:
    root = classifier_repository(model_repository, tmp_path, ("1",))
    async with registry_of(root) as registry:
        old = await registry.instance("tiny-classifier")
        shutil.copytree(model_repository / "tiny-classifier" / "2", root / "tiny-classifier" / "2")
        registry.repository.refresh()  # as its watcher does every few seconds
        # the default is now version 2: until it is ready, requests stay on version 1
        assert await registry.instance("tiny-classifier") is old
        await registry.load("tiny-classifier")
        assert (await registry.instance("tiny-classifier")).version == "2"
        assert registry.is_ready("tiny-classifier", "1")


async def test_budget_unloads_the_least_recently_used(model_repository: Path) -> None:
    before = loads("tiny-classifier", "evicted")
    async with registry_of(model_repository, max_loaded_models=2) as registry:
        await registry.instance("tiny-classifier", "1")
        await registry.instance("tiny-classifier", "2")
        await registry.instance("tiny-classifier", "1")  # version 2 is now the least recent
        await registry.instance("tiny-ner")
        assert states(registry, "tiny-classifier") == {"1": State.READY, "2": State.UNAVAILABLE}
        [evicted] = [e for e in registry.index() if (e.name, e.version) == ("tiny-classifier", "2")]
        assert evicted.reason == "evicted to make room for model 'tiny-ner' version '1'"
        assert registry.is_ready("tiny-ner")
    assert loads("tiny-classifier", "evicted") == before + 1


async def test_failed_load_is_failed_with_reason(model_repository: Path, tmp_path: Path) -> None:
    add_pickled_model(model_repository / "tiny-classifier" / "1", tmp_path)
    before = loads("pickled", "failed")
    async with registry_of(tmp_path) as registry:
        for _ in range(2):  # the second request fails at once, from the remembered reason
            with pytest.raises(Unavailable, match="safetensors") as caught:
                await registry.instance("pickled")
            assert str(tmp_path) not in caught.value.message
        [entry] = registry.index()
        assert entry.state is State.FAILED and "safetensors" in entry.reason
    assert loads("pickled", "failed") == before + 1


async def test_unload_then_lazy_reload(model_repository: Path) -> None:
    async with registry_of(model_repository) as registry:
        first = await registry.instance("tiny-ner")
        await registry.unload("tiny-ner")
        assert not registry.is_ready("tiny-ner")
        assert {e.reason for e in registry.index() if e.name == "tiny-ner"} == {"unloaded"}
        with pytest.raises(Unavailable):  # a request holding the old instance is told to retry
            await first.infer(InferRequest("tiny-ner", "", [SEQUENCE]))
        assert (await registry.instance("tiny-ner")) is not first


async def test_unknown_names_and_versions(model_repository: Path) -> None:
    async with registry_of(model_repository) as registry:
        with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
            await registry.instance("nope")
        with pytest.raises(ModelNotFound, match="no version '9'"):
            registry.is_ready("tiny-classifier", "9")


async def test_over_max_length_names_the_limit(model_repository: Path) -> None:
    async with registry_of(model_repository) as registry:
        instance = await registry.instance("tiny-classifier")
        too_long = np.full(65, 1000, dtype=np.int64)
        with pytest.raises(InputTooLong, match="at most 64"):
            await instance.infer(InferRequest("tiny-classifier", "", [SEQUENCE, too_long]))


async def test_a_requests_sequences_share_one_forward_pass(model_repository: Path) -> None:
    async with registry_of(model_repository) as registry:
        instance = await registry.instance("tiny-ner")
        sequences = [SEQUENCE, SEQUENCE[:2], np.array([101, 7, 8, 9, 102])]
        output = await instance.infer(InferRequest("tiny-ner", "", sequences))
        assert output.name == "logits" and output.array.shape == (11, 5)
        assert (instance.stats.execution_count, instance.stats.inference_count) == (1, 3)


async def test_a_version_whose_warm_up_fails_is_failed_and_never_serves(
    model_repository: Path, tmp_path: Path
) -> None:
    # tiny-overreach claims 256 tokens but has 128 positions: a long warm-up sample crashes it
    shutil.copytree(model_repository / "tiny-overreach", tmp_path / "tiny-overreach")
    toml = tmp_path / "tiny-overreach" / "model.toml"
    toml.write_text(toml.read_text() + '[warmup]\nsamples = ["' + "word " * 200 + '"]\n')
    async with registry_of(tmp_path) as registry:
        with pytest.raises(Unavailable, match="its warm-up failed") as caught:
            await registry.instance("tiny-overreach")
        [entry] = registry.index()
        assert entry.state is State.FAILED and entry.reason == caught.value.message
        assert "it serves no traffic" in entry.reason
        assert not registry.is_ready("tiny-overreach") and registry.statistics() == []


async def test_a_loaded_version_whose_folder_is_removed_unloads(
    model_repository: Path, tmp_path: Path
) -> None:
    root = classifier_repository(model_repository, tmp_path, ("1", "2"))
    async with registry_of(root) as registry:
        await registry.instance("tiny-classifier", "1")
        shutil.rmtree(root / "tiny-classifier" / "1")
        registry.repository.refresh()
        await asyncio.sleep(0.6)  # the registry's sweep runs every 0.25 s
        assert registry.statistics() == []
        assert [e.version for e in registry.index()] == ["2"]


async def test_a_pinned_version_stays_when_idle(model_repository: Path, tmp_path: Path) -> None:
    root = classifier_repository(model_repository, tmp_path, ("1", "2"))
    registry = ModelRegistry(ModelRepository(root), grace_s=1.0, idle_unload_s=0.2)
    await registry.start()
    try:
        await registry.load("tiny-classifier", "1", pin=True)
        await registry.instance("tiny-classifier", "2")
        await asyncio.sleep(0.7)
        assert states(registry, "tiny-classifier") == {"1": State.READY, "2": State.UNAVAILABLE}
        await registry.unload("tiny-classifier", "1")  # unpinned and gone; 2 stays unloaded
        assert states(registry, "tiny-classifier") == {
            "1": State.UNAVAILABLE,
            "2": State.UNAVAILABLE,
        }
    finally:
        await registry.stop()
