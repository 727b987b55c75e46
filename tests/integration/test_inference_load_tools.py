"""The inference service driven as Triton's perf_analyzer drives a server, from what the server
says about itself only. perf_analyzer's wheel needs a newer glibc than CI has, so this plays its
part: it takes each input's shape from ModelMetadata (batch dimension dropped when
max_batch_size > 0) and whether it is optional from ModelConfig, builds every required input
from those alone, sends ModelInfer at concurrency 1 and 8, and reads ModelStatistics, where it
aborts unless compute_input, compute_infer and compute_output counts are equal."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc.aio as triton
from transformers import AutoTokenizer
from tritonclient.grpc import InferInput, model_config_pb2, service_pb2

from fmserve.rpc.service import Service
from tests.integration.test_inference_service import start
from tests.models import MINILM

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)

MODEL = "minilm-embed"
TOKENS = 12  # what a user would pass as --shape input_ids:12
REQUESTS = 24
_NUMPY = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32}


@pytest.fixture(scope="module")
async def service(model_repository: Path):
    service = await start(model_repository)
    yield service
    await service.stop()


@pytest.fixture(scope="module")
async def client(service: Service):
    client = triton.InferenceServerClient(f"127.0.0.1:{service.port}")
    yield client
    await client.close()


@pytest.fixture(scope="module")
def token_ids() -> list[int]:
    """The --input-data a user gives: one tokenized sentence, TOKENS ids long."""
    tokenizer = AutoTokenizer.from_pretrained(MINILM, local_files_only=True)
    ids = tokenizer("perf analyzer sends this sentence again and again to the server")
    return ids["input_ids"][:TOKENS]


def datatype(config_type: int) -> str:
    """ModelConfig's TYPE_INT64 as ModelMetadata spells it: INT64."""
    return model_config_pb2.DataType.Name(config_type).removeprefix("TYPE_")


def sample_shape(
    metadata: service_pb2.ModelMetadataResponse.TensorMetadata, max_batch_size: int
) -> list[int]:
    """One batch item's shape as perf_analyzer reads it: metadata's, less the batch dimension."""
    return list(metadata.shape)[1:] if max_batch_size > 0 else list(metadata.shape)


async def required_inputs(
    client: triton.InferenceServerClient, batch: int, ids: list[int]
) -> list[InferInput]:
    config = (await client.get_model_config(MODEL)).config
    metadata = await client.get_model_metadata(MODEL)
    optional = {i.name for i in config.input if i.optional}
    inputs = []
    for tensor in metadata.inputs:
        shape = sample_shape(tensor, config.max_batch_size)
        assert shape, f"{tensor.name}: perf_analyzer cannot set the shape of a scalar input"
        if tensor.name in optional:
            continue  # perf_analyzer leaves out optional inputs its data does not hold
        shape = [TOKENS if d == -1 else d for d in shape]
        sample = np.resize(np.asarray(ids, dtype=_NUMPY[tensor.datatype]), shape)
        array = np.stack([sample] * batch) if config.max_batch_size > 0 else sample
        infer_input = InferInput(tensor.name, list(array.shape), tensor.datatype)
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return inputs


async def statistics(client: triton.InferenceServerClient) -> service_pb2.ModelStatistics:
    [stats] = (await client.get_inference_statistics(MODEL)).model_stats
    return stats


@pytest.mark.parametrize(("batch", "concurrency"), [(1, 1), (1, 8), (8, 1), (8, 8)])
async def test_perf_analyzer_runs_from_config_alone(
    client: triton.InferenceServerClient, token_ids: list[int], batch: int, concurrency: int
) -> None:
    inputs = await required_inputs(client, batch, token_ids)
    await client.infer(MODEL, inputs)  # loaded before measuring, as perf_analyzer warms up
    before = await statistics(client)

    async def worker() -> None:
        for _ in range(REQUESTS // concurrency):
            result = await client.infer(MODEL, inputs)
            assert result.as_numpy("embeddings").shape == (batch, 384)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    after = await statistics(client)

    def delta(name: str) -> int:
        now, then = (getattr(s.inference_stats, name).count for s in (after, before))
        return now - then

    executions = after.execution_count - before.execution_count
    assert delta("success") == REQUESTS
    assert after.inference_count - before.inference_count == REQUESTS * batch
    assert delta("compute_input") == delta("compute_infer") == delta("compute_output") == executions
    assert executions > 0 and delta("queue") > 0  # perf_analyzer finds the version by its queue
    for name in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(after.inference_stats, name).ns > getattr(before.inference_stats, name).ns


# What perf_analyzer must build for each model: token ids unless listed; an audio model takes
# samples, a ViT pixels, and CLIP pixels or token ids, one kind per request (none required).
AUDIO_INPUTS = ["input_values"]
REQUIRED_INPUTS = {
    "tiny-vit": ["pixel_values"],
    "tiny-clip": [],
    "tiny-wav2vec2-ctc": AUDIO_INPUTS,
    "tiny-audio-classifier": AUDIO_INPUTS,
    "silero-vad": AUDIO_INPUTS,
}


async def test_every_model_config_agrees_with_its_metadata(
    client: triton.InferenceServerClient,
) -> None:
    names = {m.name for m in (await client.get_model_repository_index()).models}
    for name in sorted(names):
        config = (await client.get_model_config(name)).config
        metadata = await client.get_model_metadata(name)
        batched = config.max_batch_size > 0
        for kind, described, declared in (
            ("input", metadata.inputs, config.input),
            ("output", metadata.outputs, config.output),
        ):
            by_name = {tensor.name: tensor for tensor in declared}
            assert sorted(by_name) == sorted(t.name for t in described), (name, kind)
            for tensor in described:
                entry = by_name[tensor.name]
                where = f"{name} {kind} {tensor.name}"
                assert datatype(entry.data_type) == tensor.datatype, where
                assert list(tensor.shape) == ([-1] if batched else []) + list(entry.dims), where
                assert sample_shape(tensor, config.max_batch_size), where
        required = [i.name for i in config.input if not i.optional]
        assert required == REQUIRED_INPUTS.get(name, ["input_ids"]), name
