"""The preprocess and postprocess services as real grpc.aio servers, called through the
generated stubs: tokens out of one go into the other, as the gateway chains them."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import chain
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoTokenizer

from fmserve.core import tensors
from fmserve.rpc.service import Service
from fmserve.v1 import (
    common_pb2,
    postprocess_pb2,
    postprocess_pb2_grpc,
    preprocess_pb2,
    preprocess_pb2_grpc,
)
from services.postprocess.__main__ import build as build_postprocess
from services.postprocess.settings import PostprocessSettings
from services.preprocess.__main__ import build as build_preprocess
from services.preprocess.settings import PreprocessSettings

POLL_S = 0.05
"""How often these services reread the repository: a model added by a test is seen soon."""

TEXTS = ["Wolfgang Mozart lives in Salzburg.", "Hello world"]
NER_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")


@pytest.fixture(scope="module")
async def preprocess_channel(model_repository: Path):
    settings = PreprocessSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        grace_period_s=1.0,
        model_repository=model_repository,
        repository_poll_s=POLL_S,
        tokenizer_threads=1,
        worker_enabled=False,  # the synchronous path only: the job workers have their own tests
    )
    async with _serving(build_preprocess(settings)) as channel:
        yield channel


@pytest.fixture(scope="module")
async def postprocess_channel(model_repository: Path):
    # offload_min_rows=0: every batch goes through the worker thread, as big ones do.
    settings = PostprocessSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        grace_period_s=1.0,
        model_repository=model_repository,
        repository_poll_s=POLL_S,
        offload_min_rows=0,
        worker_enabled=False,
    )
    async with _serving(build_postprocess(settings)) as channel:
        yield channel


@pytest.fixture
def preprocess(preprocess_channel):
    return preprocess_pb2_grpc.PreprocessStub(preprocess_channel)


@pytest.fixture
def postprocess(postprocess_channel):
    return postprocess_pb2_grpc.PostprocessStub(postprocess_channel)


@pytest.fixture
async def broken_model(model_repository: Path) -> AsyncIterator[str]:
    """A model whose model.toml names a task fmserve does not do, added while the services run
    (seen within their poll); removed afterwards, as the session's other tests share the
    repository."""
    folder = model_repository / "broken-toml"
    folder.mkdir()
    (folder / "model.toml").write_text('task = "translation"\n')
    await asyncio.sleep(POLL_S * 4)
    yield folder.name
    shutil.rmtree(folder)


@asynccontextmanager
async def _serving(service: Service) -> AsyncIterator[grpc.aio.Channel]:
    """The service started on a free port, and a channel to it; both closed on exit."""
    await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        yield channel
    finally:
        await channel.close()
        await service.stop()


async def _error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def _health(channel: grpc.aio.Channel, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return (await health_pb2_grpc.HealthStub(channel).Check(request)).status


async def test_each_service_reports_serving(preprocess_channel, postprocess_channel):
    serving = health_pb2.HealthCheckResponse.SERVING

    assert await _health(preprocess_channel, "fmserve.v1.Preprocess") == serving
    assert await _health(postprocess_channel, "fmserve.v1.Postprocess") == serving


async def test_tokenize_matches_the_hugging_face_tokenizer(preprocess, model_repository):
    reference = AutoTokenizer.from_pretrained(
        model_repository / "tiny-ner" / "1", local_files_only=True
    )

    reply = await preprocess.Tokenize(
        preprocess_pb2.TokenizeRequest(model="tiny-ner", texts=TEXTS, return_offsets=True)
    )

    expected = reference(TEXTS, return_offsets_mapping=True)
    ids = tensors.to_domain(reply.input_ids)
    assert reply.input_ids.dtype == "INT64" and reply.lengths.dtype == "INT32"
    assert ids.tolist() == list(chain.from_iterable(expected["input_ids"]))
    assert tensors.to_domain(reply.lengths).tolist() == [len(i) for i in expected["input_ids"]]
    offsets = tensors.to_domain(reply.offsets)
    assert list(reply.offsets.shape) == [len(ids), 2]
    assert offsets.tolist() == [list(p) for p in chain.from_iterable(expected["offset_mapping"])]


async def test_tokenize_without_offsets_leaves_them_empty(preprocess):
    reply = await preprocess.Tokenize(
        preprocess_pb2.TokenizeRequest(model="minilm-embed", texts=["Hello world"])
    )

    assert tensors.to_domain(reply.input_ids).tolist() == [101, 7592, 2088, 102]
    assert not reply.HasField("offsets")


async def test_too_long_is_invalid_argument_unless_truncated(preprocess):
    request = preprocess_pb2.TokenizeRequest(model="tiny-classifier", texts=["word " * 100])

    error = await _error(preprocess.Tokenize(request))
    request.truncate = True
    reply = await preprocess.Tokenize(request)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "texts[0] is 102 tokens long" in error.details()
    assert "set truncate" in error.details()
    assert tensors.to_domain(reply.lengths).tolist() == [64]


async def test_tokenize_refusals(preprocess):
    unknown = preprocess_pb2.TokenizeRequest(model="nope", texts=["hi"])
    blank = preprocess_pb2.TokenizeRequest(model="tiny-ner", texts=["hi", "  "])

    not_found = await _error(preprocess.Tokenize(unknown))
    invalid = await _error(preprocess.Tokenize(blank))

    assert not_found.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown model 'nope'" in not_found.details()
    assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "texts[1]" in invalid.details()


async def test_entities_round_trip_through_both_services(preprocess, postprocess):
    tokens = await preprocess.Tokenize(
        preprocess_pb2.TokenizeRequest(model="tiny-ner", texts=TEXTS, return_offsets=True)
    )
    offsets = tensors.to_domain(tokens.offsets)
    # wolfgang mozart → PER, salzburg → LOC, the rest O: logits the model could have given
    spans = {(0, 8): "B-PER", (9, 15): "I-PER", (25, 33): "B-LOC"}
    tags = [NER_LABELS.index(spans.get(tuple(o), "O")) for o in offsets.tolist()]
    logits = np.full((len(tags), len(NER_LABELS)), -3.0, dtype=np.float32)
    logits[np.arange(len(tags)), tags] = 3.0

    reply = await postprocess.Postprocess(
        postprocess_pb2.PostprocessRequest(
            model="tiny-ner",
            task=common_pb2.TASK_TOKEN_CLASSIFICATION,
            output=tensors.to_wire(logits),
            texts=TEXTS,
            lengths=tokens.lengths,
            offsets=tokens.offsets,
        )
    )

    first, second = (r.entities.entities for r in reply.results)
    assert [(e.label, e.text, e.start, e.end) for e in first] == [
        ("PER", "Wolfgang Mozart", 0, 15),
        ("LOC", "Salzburg", 25, 33),
    ]
    assert first[0].score == pytest.approx(np.exp(3) / (np.exp(3) + 4 * np.exp(-3)), rel=1e-5)
    assert list(second) == []


async def test_classification_round_trip(postprocess):
    logits = np.array([[0.0, 0.0, 2.0], [1.0, 0.0, 0.0]], dtype=np.float32)

    reply = await postprocess.Postprocess(
        postprocess_pb2.PostprocessRequest(
            model="tiny-classifier",
            version="1",
            task=common_pb2.TASK_TEXT_CLASSIFICATION,
            output=tensors.to_wire(logits),
            top_k=2,
        )
    )

    labels = [[(s.label, s.score) for s in r.classification.labels] for r in reply.results]
    e = np.exp(2.0)
    assert [[label for label, _ in row] for row in labels] == [
        ["positive", "negative"],
        ["negative", "neutral"],
    ]
    assert labels[0][0][1] == pytest.approx(e / (e + 2), rel=1e-6)


async def test_embeddings_round_trip(postprocess):
    vectors = np.array([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)

    reply = await postprocess.Postprocess(
        postprocess_pb2.PostprocessRequest(
            model="minilm-embed",
            task=common_pb2.TASK_EMBEDDING,
            output=tensors.to_wire(vectors),
        )
    )

    assert [list(r.embedding.values) for r in reply.results] == vectors.tolist()


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"output": tensors.to_wire(np.zeros((2, 4), dtype=np.float32))}, "4 columns"),
        ({"texts": ["just one"]}, "2 rows but 1 texts"),
        ({"task": 99}, "unknown task 99"),
        ({"task": common_pb2.TASK_EMBEDDING}, "does text-classification, not embedding"),
        ({"output": common_pb2.Tensor(dtype="FP32", shape=[2, 3], data=b"\0")}, "needs 24 bytes"),
    ],
)
async def test_postprocess_refusals_are_invalid_argument(postprocess, changes, fragment):
    request = postprocess_pb2.PostprocessRequest(
        model="tiny-classifier",
        task=common_pb2.TASK_TEXT_CLASSIFICATION,
        output=tensors.to_wire(np.zeros((2, 3), dtype=np.float32)),
    )
    for name, value in changes.items():
        if isinstance(value, common_pb2.Tensor):
            getattr(request, name).CopyFrom(value)
        elif isinstance(value, list):
            getattr(request, name).extend(value)
        else:
            setattr(request, name, value)

    error = await _error(postprocess.Postprocess(request))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in error.details()


async def test_postprocess_of_an_unknown_model_is_not_found(postprocess):
    request = postprocess_pb2.PostprocessRequest(
        model="nope", output=tensors.to_wire(np.zeros((1, 3), dtype=np.float32))
    )

    error = await _error(postprocess.Postprocess(request))

    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_a_broken_model_toml_is_unavailable_with_its_cause(
    preprocess, postprocess, broken_model, model_repository
):
    tokenize = preprocess_pb2.TokenizeRequest(model=broken_model, texts=["hi"])
    outputs = postprocess_pb2.PostprocessRequest(
        model=broken_model, output=tensors.to_wire(np.zeros((1, 3), dtype=np.float32))
    )

    errors = [
        await _error(preprocess.Tokenize(tokenize)),
        await _error(postprocess.Postprocess(outputs)),
    ]

    for error in errors:  # UNAVAILABLE, not INTERNAL: the model serves once the file is fixed
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "model 'broken-toml' cannot be served" in error.details()
        assert "'translation' is not a valid TaskName" in error.details()
        assert str(model_repository) not in error.details()
        assert dict(error.trailing_metadata() or ())["fmserve-error"] == "ConfigError"
