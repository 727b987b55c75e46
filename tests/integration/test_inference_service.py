"""The inference service as a real grpc.aio server, called the way fmserve's gateway and standard
v2 tooling call it: tritonclient's asyncio client, plus the raw stub for typed contents. Model
outputs are checked against the same models computed in-process with transformers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc.aio as triton
from prometheus_client import REGISTRY
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)
from tritonclient.grpc import InferInput, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from fmserve.rpc.service import Service
from services.inference.__main__ import build
from services.inference.settings import InferenceSettings
from tests.models import MINILM, add_pickled_model

pytestmark = pytest.mark.timeout(60)
torch.set_num_threads(1)

TEXTS = ["Wolfgang Mozart lives in Salzburg.", "Hello world", "A much longer sentence, to pad."]
Code = grpc.StatusCode


async def start(repository: Path, **overrides: object) -> Service:
    settings = InferenceSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        grace_period_s=1.0,
        model_repository=repository,
        worker_enabled=False,  # the synchronous path only: the job workers have their own tests
        **overrides,
    )
    service = build(settings)
    await service.start()
    return service


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
def token_ids() -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(MINILM, local_files_only=True)
    return tokenizer(TEXTS)["input_ids"]


def ragged(ids: list[list[int]]) -> list[InferInput]:
    flat = np.array([t for row in ids for t in row], dtype=np.int64)
    lengths = np.array([len(row) for row in ids], dtype=np.int32)
    return [tensor("input_ids", flat, "INT64"), tensor("lengths", lengths, "INT32")]


def padded(ids: list[list[int]], with_mask: bool = True) -> list[InferInput]:
    array, mask = padded_arrays(ids)
    inputs = [tensor("input_ids", array, "INT64")]
    return [*inputs, tensor("attention_mask", mask, "INT64")] if with_mask else inputs


def padded_arrays(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    longest = max(len(row) for row in ids)
    array = np.zeros((len(ids), longest), dtype=np.int64)
    mask = np.zeros_like(array)
    for i, row in enumerate(ids):
        array[i, : len(row)], mask[i, : len(row)] = row, 1
    return array, mask


def tensor(name: str, array: np.ndarray, datatype: str) -> InferInput:
    infer_input = InferInput(name, list(array.shape), datatype)
    infer_input.set_data_from_numpy(array)
    return infer_input


def reference_logits(auto_class: type, folder: Path, ids: list[list[int]]) -> list[np.ndarray]:
    """Per-sequence logits of the model computed in-process, without padding."""
    model = auto_class.from_pretrained(folder, local_files_only=True).eval()
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([row])).logits[0].numpy() for row in ids]


def reference_embeddings(ids: list[list[int]]) -> np.ndarray:
    model = AutoModel.from_pretrained(MINILM, local_files_only=True).eval()
    array, mask = (torch.from_numpy(a) for a in padded_arrays(ids))
    with torch.inference_mode():
        hidden = model(input_ids=array, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).float()
    pooled = (hidden * weights).sum(1) / weights.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def histogram(name: str, model: str) -> tuple[float, float]:
    labels = {"model": model}
    get = REGISTRY.get_sample_value
    return get(f"{name}_sum", labels) or 0.0, get(f"{name}_count", labels) or 0.0


async def expect_error(code: grpc.StatusCode, call, match: str = "") -> str:
    with pytest.raises(InferenceServerException) as caught:
        await call
    assert caught.value.status() == f"StatusCode.{code.name}", caught.value.message()
    assert match in caught.value.message()
    return caught.value.message()


async def test_server_live_ready_and_metadata(client: triton.InferenceServerClient) -> None:
    assert await client.is_server_live()
    assert await client.is_server_ready()
    metadata = await client.get_server_metadata()
    assert metadata.name == "fmserve-inference"
    assert "model_repository" in metadata.extensions


async def test_repository_index_lists_every_version(client: triton.InferenceServerClient) -> None:
    index = await client.get_model_repository_index()
    versions = {(m.name, m.version) for m in index.models}
    assert {("minilm-embed", "1"), ("tiny-classifier", "1"), ("tiny-classifier", "2")} <= versions
    assert {("tiny-ner", "1"), ("minilm-sentiment", "1")} <= versions


async def test_model_ready_follows_load_and_unload(client: triton.InferenceServerClient) -> None:
    await client.unload_model("tiny-ner")
    assert not await client.is_model_ready("tiny-ner")
    await client.load_model("tiny-ner")
    assert await client.is_model_ready("tiny-ner")
    assert await client.is_model_ready("tiny-ner", "1")
    index = await client.get_model_repository_index()
    assert [m.state for m in index.models if m.name == "tiny-ner"] == ["READY"]
    await client.unload_model("tiny-ner")
    assert not await client.is_model_ready("tiny-ner")


async def test_model_metadata_and_config(client: triton.InferenceServerClient) -> None:
    metadata = await client.get_model_metadata("minilm-embed")
    assert [(i.name, i.datatype) for i in metadata.inputs] == [
        ("input_ids", "INT64"),
        ("attention_mask", "INT64"),
        ("lengths", "INT32"),
    ]
    assert [(o.name, list(o.shape)) for o in metadata.outputs] == [("embeddings", [-1, 384])]
    config = (await client.get_model_config("tiny-classifier")).config
    assert config.max_batch_size == 8
    assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [3])]
    assert config.parameters["labels"].string_value == "negative,neutral,positive"


async def test_embeddings_match_transformers_in_both_forms(
    client: triton.InferenceServerClient, token_ids: list[list[int]]
) -> None:
    expected = reference_embeddings(token_ids)
    from_ragged = (await client.infer("minilm-embed", ragged(token_ids))).as_numpy("embeddings")
    from_padded = (await client.infer("minilm-embed", padded(token_ids))).as_numpy("embeddings")
    assert from_ragged.shape == from_padded.shape == (3, 384)
    cosine = (from_ragged * expected).sum(axis=1)
    assert cosine.min() >= 0.999
    np.testing.assert_allclose(from_ragged, from_padded, atol=1e-5)


async def test_padded_rows_without_a_mask_are_refused_naming_it(
    client: triton.InferenceServerClient, token_ids: list[list[int]]
) -> None:
    # Without the mask the pad tokens would be embedded as text (cosine 0.47 to the answer),
    # whether the client padded several rows or one.
    for ids in (token_ids, [[*token_ids[1], 0, 0]]):
        message = await expect_error(
            Code.INVALID_ARGUMENT,
            client.infer("minilm-embed", padded(ids, with_mask=False)),
            "attention_mask",
        )
        assert "pad token id 0" in message
    # rows that need no padding need no mask
    same_length = [token_ids[1], token_ids[1][::-1]]
    result = await client.infer("minilm-embed", padded(same_length, with_mask=False))
    cosine = (result.as_numpy("embeddings") * reference_embeddings(same_length)).sum(axis=1)
    assert cosine.min() >= 0.999


async def test_typed_contents_get_raw_outputs(service: Service, token_ids: list[list[int]]) -> None:
    request = service_pb2.ModelInferRequest(model_name="minilm-embed")
    ids = request.inputs.add(name="input_ids", datatype="INT64", shape=[len(token_ids[1])])
    ids.contents.int64_contents.extend(token_ids[1])
    lengths = request.inputs.add(name="lengths", datatype="INT32", shape=[1])
    lengths.contents.int_contents.append(len(token_ids[1]))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        response = await service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert list(response.outputs[0].shape) == [1, 384]
    vector = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
    assert (vector * reference_embeddings(token_ids[1:2])[0]).sum() >= 0.999


async def test_classifier_versions_match_transformers(
    client: triton.InferenceServerClient, token_ids: list[list[int]], model_repository: Path
) -> None:
    results = {}
    for version in ("1", "2"):
        folder = model_repository / "tiny-classifier" / version
        expected = np.stack(reference_logits(AutoModelForSequenceClassification, folder, token_ids))
        result = await client.infer("tiny-classifier", ragged(token_ids), model_version=version)
        assert result.get_response().model_version == version
        results[version] = result.as_numpy("logits")
        np.testing.assert_allclose(results[version], expected, atol=1e-4)
    assert not np.allclose(results["1"], results["2"], atol=1e-3)


async def test_token_logits_match_in_both_forms(
    client: triton.InferenceServerClient, token_ids: list[list[int]], model_repository: Path
) -> None:
    folder = model_repository / "tiny-ner" / "1"
    expected = reference_logits(AutoModelForTokenClassification, folder, token_ids)
    flat = (await client.infer("tiny-ner", ragged(token_ids))).as_numpy("logits")
    np.testing.assert_allclose(flat, np.concatenate(expected), atol=1e-4)
    square = (await client.infer("tiny-ner", padded(token_ids))).as_numpy("logits")
    assert square.shape == (3, max(len(row) for row in token_ids), 5)
    for row, want in enumerate(expected):
        np.testing.assert_allclose(square[row, : len(want)], want, atol=1e-4)


async def test_zero_shot_prototypes_give_sharp_sane_scores(
    client: triton.InferenceServerClient,
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(MINILM, local_files_only=True)
    texts = ["I absolutely love this, it is wonderful!", "The parcel was delivered.", "meh"]
    ids = tokenizer(texts)
    logits = (await client.infer("minilm-sentiment", ragged(ids["input_ids"]))).as_numpy("logits")
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = exp / exp.sum(axis=1, keepdims=True)
    labels = ["positive", "negative", "neutral"]  # the order of [prototypes] in model.toml
    assert [labels[i] for i in probabilities[:2].argmax(axis=1)] == ["positive", "neutral"]
    assert probabilities[:2].max(axis=1).min() > 0.9  # sharp where the text is clear
    assert probabilities[2].max() < 0.9  # graded where it is not


async def test_concurrent_requests_are_batched_and_answered_correctly(
    client: triton.InferenceServerClient,
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(MINILM, local_files_only=True)
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'dogs'}" for i in range(16)]
    ids = tokenizer(texts)["input_ids"]
    await client.infer("minilm-embed", ragged(ids[:1]))  # loaded before the burst
    size_sum, batches = histogram("fmserve_inference_batch_size", "minilm-embed")
    results = await asyncio.gather(
        *(
            client.infer("minilm-embed", ragged([row]), priority=1 + i % 2)
            for i, row in enumerate(ids)
        )
    )
    new_sum, new_batches = histogram("fmserve_inference_batch_size", "minilm-embed")
    assert new_sum - size_sum == 16
    assert new_batches - batches < 16  # at least one batch held more than one request
    got = np.concatenate([r.as_numpy("embeddings") for r in results])
    assert (got * reference_embeddings(ids)).sum(axis=1).min() >= 0.999


async def test_statistics_count_inferences(client: triton.InferenceServerClient) -> None:
    await client.infer("tiny-classifier", ragged([[101, 102], [101, 7, 102]]))
    stats = await client.get_inference_statistics("tiny-classifier", "2")
    [model] = stats.model_stats
    assert model.inference_count >= 2 and model.execution_count >= 1
    assert model.inference_stats.success.count >= 1 and model.inference_stats.success.ns > 0


@pytest.mark.parametrize(
    ("model", "version", "inputs", "code", "match"),
    [
        ("nope", "", ragged([[101, 102]]), Code.NOT_FOUND, "unknown model 'nope'"),
        ("tiny-classifier", "7", ragged([[101, 102]]), Code.NOT_FOUND, "no version '7'"),
        (
            "tiny-classifier",
            "",
            [tensor("input_ids", np.array([101, 102], np.int32), "INT32")],
            Code.INVALID_ARGUMENT,
            "send INT64",
        ),
        (
            "tiny-classifier",
            "",
            [
                tensor("input_ids", np.array([101, 7, 102], np.int64), "INT64"),
                tensor("lengths", np.array([2, 2], np.int32), "INT32"),
            ],
            Code.INVALID_ARGUMENT,
            "lengths sum to 4",
        ),
        ("tiny-classifier", "", ragged([[101] * 65]), Code.INVALID_ARGUMENT, "at most 64"),
        ("tiny-classifier", "", ragged([[101, 40000]]), Code.INVALID_ARGUMENT, "[0, 30522)"),
    ],
)
async def test_bad_requests_get_the_right_status(
    client: triton.InferenceServerClient,
    model: str,
    version: str,
    inputs: list[InferInput],
    code: grpc.StatusCode,
    match: str,
) -> None:
    await expect_error(code, client.infer(model, inputs, model_version=version), match)


async def test_unknown_model_in_other_methods_is_not_found(
    client: triton.InferenceServerClient,
) -> None:
    await expect_error(Code.NOT_FOUND, client.is_model_ready("nope"))
    await expect_error(Code.NOT_FOUND, client.get_model_metadata("nope"))
    await expect_error(Code.NOT_FOUND, client.get_model_config("tiny-classifier", "9"))


async def test_model_that_failed_to_load_is_unavailable(
    model_repository: Path, tmp_path: Path
) -> None:
    add_pickled_model(model_repository / "tiny-classifier" / "1", tmp_path)
    service = await start(tmp_path)
    try:
        async with triton.InferenceServerClient(f"127.0.0.1:{service.port}") as client:
            message = await expect_error(
                Code.UNAVAILABLE, client.infer("pickled", ragged([[101, 102]])), "safetensors"
            )
            assert str(tmp_path) not in message
            await expect_error(Code.UNAVAILABLE, client.load_model("pickled"), "safetensors")
    finally:
        await service.stop()


async def test_a_broken_model_toml_is_unavailable_with_its_cause(tmp_path: Path) -> None:
    (tmp_path / "broken-toml").mkdir()
    (tmp_path / "broken-toml" / "model.toml").write_text('task = "translation"\n')
    service = await start(tmp_path)
    try:
        async with triton.InferenceServerClient(f"127.0.0.1:{service.port}") as client:
            cause = "'translation' is not a valid TaskName"
            message = await expect_error(
                Code.UNAVAILABLE, client.infer("broken-toml", ragged([[101, 102]])), cause
            )
            await expect_error(Code.UNAVAILABLE, client.get_model_metadata("broken-toml"), cause)
            [entry] = (await client.get_model_repository_index()).models
            assert str(tmp_path) not in message
            assert (entry.name, entry.state) == ("broken-toml", "UNAVAILABLE")
            assert cause in entry.reason
    finally:
        await service.stop()
