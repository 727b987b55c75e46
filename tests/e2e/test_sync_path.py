"""The synchronous path end to end: five services as processes, real models, real Redis."""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fmserve import AsyncClient, Client
from fmserve.cli.cluster import Cluster
from fmserve.core.repository import ModelRepository
from fmserve.errors import (
    InputTooLong,
    InvalidInput,
    ModelNotFound,
    TooLarge,
    Unavailable,
    WrongTask,
)
from fmserve.v1 import gateway_pb2, gateway_pb2_grpc
from tests import reference
from tests.e2e.conftest import MAX_ITEMS, MAX_REQUEST_BYTES, metric

pytestmark = pytest.mark.e2e

BATCHERS = ("gateway", "inference")
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Serving models on your own machines.",
    "Ada Lovelace lived in London.",
]


def unique(text: str) -> str:
    """A text no earlier test has sent, so the cache cannot answer it."""
    return f"{text} ({uuid.uuid4().hex[:8]})"


@pytest.fixture(scope="module")
def client(gateway_address: str) -> Client:
    with Client(gateway_address) as c:
        yield c


def test_embeddings_match_the_model_in_process(client: Client, model_repository: Path) -> None:
    vectors = client.embed(SENTENCES, model="minilm-embed", cache="bypass")
    folder = _files(model_repository, "minilm-embed")
    expected = reference.embed(folder, SENTENCES)
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    cosines = (vectors * expected).sum(axis=1)
    assert cosines.min() >= 0.999, cosines


def test_classification_matches_the_model_in_process(
    client: Client, model_repository: Path
) -> None:
    texts = ["I love it", "It broke after a day"]
    answers = client.classify(texts, model="tiny-classifier", cache="bypass")
    probs = reference.classify(model_repository / "tiny-classifier" / "2", texts)
    labels = ("negative", "neutral", "positive")
    for answer, row in zip(answers, probs, strict=True):
        assert [a.label for a in answer] == [labels[i] for i in np.argsort(-row)]
        assert [a.score for a in answer] == pytest.approx(sorted(row, reverse=True), abs=1e-4)


def test_top_k_keeps_the_best_labels(client: Client) -> None:
    (answer,) = client.classify(["fine"], model="tiny-classifier", top_k=2)
    assert len(answer) == 2 and answer[0].score >= answer[1].score


def test_versions_answer_separately(client: Client, model_repository: Path) -> None:
    v1 = client.infer(["same text"], "tiny-classifier", version="1")
    v2 = client.infer(["same text"], "tiny-classifier", version="2")
    assert (v1.version, v2.version) == ("1", "2")
    expected = reference.classify(model_repository / "tiny-classifier" / "1", ["same text"])[0]
    assert max(s.score for s in v1.results[0]) == pytest.approx(expected.max(), abs=1e-4)
    assert v1.results[0] != v2.results[0]


def test_zero_shot_sentiment_on_the_bundled_encoder(client: Client) -> None:
    answers = client.classify(
        ["I love it, wonderful!", "This is awful, I hate it."], model="minilm-sentiment"
    )
    assert answers[0][0].label == "positive"
    assert answers[1][0].label == "negative"
    assert sum(s.score for s in answers[0]) == pytest.approx(1.0, abs=1e-4)


def test_entities_agree_with_the_model_in_process(client: Client, model_repository: Path) -> None:
    text = "Ada Lovelace lived in London with Charles Babbage."
    (entities,) = client.entities([text], model="tiny-ner", cache="bypass")
    tokens = reference.token_labels(model_repository / "tiny-ner" / "1", text)
    for entity in entities:
        assert entity.text == text[entity.start : entity.end]
        inside = [label for label, s, e in tokens if s >= entity.start and e <= entity.end]
        assert inside and all(label.endswith(entity.label) for label in inside)
        assert 0.0 < entity.score <= 1.0
    tagged = {(s, e) for label, s, e in tokens if label != "O"}
    covered = {(s, e) for _, s, e in tokens if any(x.start <= s and e <= x.end for x in entities)}
    assert tagged == covered


def test_repeat_request_is_a_cache_hit(client: Client) -> None:
    text = unique("cache me")
    first = client.infer([text], "minilm-embed")
    second = client.infer([text], "minilm-embed")
    assert not first.cache_hit and second.cache_hit
    assert np.array_equal(first.results[0], second.results[0])
    assert not client.infer([text], "minilm-embed", cache="bypass").cache_hit
    assert not client.infer([text], "minilm-embed", cache="refresh").cache_hit
    mixed = client.infer([text, unique("new")], "minilm-embed")
    assert mixed.cached == [True, False]


def test_a_repeat_is_answered_from_the_gateways_memory(cluster: Cluster, client: Client) -> None:
    text, model = unique("near"), "minilm-embed"
    first = client.infer([text], model)

    def counted() -> tuple[float, float]:
        near = metric(cluster, "gateway", "fmserve_gateway_near_cache_hits_total", model=model)
        lookups = metric(cluster, "cache", "fmserve_cache_requests_total", method="Lookup")
        return near, lookups

    near, lookups = counted()
    again = client.infer([text], model)
    assert again.cache_hit and np.array_equal(first.results[0], again.results[0])
    assert counted() == (near + 1, lookups)  # answered by the gateway, no call to the cache


def test_cache_keys_include_the_version(client: Client) -> None:
    text = unique("versioned")
    client.infer([text], "tiny-classifier", version="1")
    assert not client.infer([text], "tiny-classifier", version="2").cache_hit
    assert client.infer([text], "tiny-classifier", version="1").cache_hit


def test_truncate_option_accepts_long_texts(client: Client) -> None:
    long_text = "word " * 400
    with pytest.raises(InputTooLong, match="truncate"):
        client.embed([long_text])
    assert client.embed([long_text], truncate=True).shape == (1, 384)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda c: c.embed(["x"], model="no-such-model"), ModelNotFound, "minilm-embed"),
        (lambda c: c.infer(["x"], "tiny-classifier", version="9"), ModelNotFound, "version"),
        (lambda c: c.embed(["x"], model="tiny-classifier"), WrongTask, "text-classification"),
        (lambda c: c.embed([]), InvalidInput, "empty"),
        (lambda c: c.embed(["ok", "  "]), InvalidInput, r"texts\[1\]"),
        (lambda c: c.embed(["x"] * (MAX_ITEMS + 1)), TooLarge, str(MAX_ITEMS)),
        (lambda c: c.infer(["x"], ""), InvalidInput, "model is required"),
        (lambda c: c.classify(["x"], "tiny-classifier", top_k=-1), InvalidInput, "top_k"),
    ],
)
def test_bad_input_gets_a_clear_status(client: Client, call, error, message) -> None:
    with pytest.raises(error, match=message):
        call(client)


def test_raw_grpc_bad_payloads(gateway_address: str) -> None:
    with grpc.insecure_channel(gateway_address) as channel:
        infer = channel.unary_unary("/fmserve.v1.Gateway/Infer")
        with pytest.raises(grpc.RpcError) as garbage:
            infer(b"\xff\xff\xff not a protobuf", timeout=10)
        assert garbage.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid fmserve.v1.InferRequest" in garbage.value.details()
        stub = gateway_pb2_grpc.GatewayStub(channel)
        huge = gateway_pb2.InferRequest(
            model="minilm-embed", texts=["x" * (MAX_REQUEST_BYTES + 10)]
        )
        with pytest.raises(grpc.RpcError) as oversized:
            stub.Infer(huge, timeout=10)
        assert oversized.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        ok = stub.Infer(
            gateway_pb2.InferRequest(model="minilm-embed", texts=["still serving"]), timeout=30
        )
        assert len(ok.results) == 1


def _histogram(cluster: Cluster, service: str, name: str, model: str) -> tuple[float, float]:
    """(count, sum) of a histogram scraped from a service's /metrics."""
    port = cluster.replicas_of[service][0].metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for suffix in ("count", "sum"):
        line = next(
            x for x in text.splitlines() if x.startswith(f'{name}_{suffix}{{model="{model}"')
        )
        values[suffix] = float(line.rsplit(" ", 1)[1])
    return values["count"], values["sum"]


async def test_concurrent_requests_are_batched_and_each_answered(cluster: Cluster) -> None:
    texts = [unique(f"sentence number {i}") for i in range(32)]
    before = {
        s: _histogram(cluster, s, f"fmserve_{s}_batch_size", "minilm-embed") for s in BATCHERS
    }
    async with AsyncClient(cluster.address("gateway")) as client:
        answers = await asyncio.gather(*(client.embed([t], cache="bypass") for t in texts))
    after = {s: _histogram(cluster, s, f"fmserve_{s}_batch_size", "minilm-embed") for s in BATCHERS}
    for service in BATCHERS:
        batches, sequences = (a - b for a, b in zip(after[service], before[service], strict=True))
        assert sequences == 32 and batches < 32, (service, batches)  # some were grouped
    async with AsyncClient(cluster.address("gateway")) as client:
        together = await client.embed(texts, cache="bypass")
    single = np.concatenate(answers)
    assert (single * together).sum(axis=1).min() >= 0.999


def test_models_are_listed(client: Client) -> None:
    models = {m.name: m for m in client.models()}
    assert {"minilm-embed", "minilm-sentiment", "tiny-classifier", "tiny-ner"} <= set(models)
    assert models["minilm-embed"].dimensions == 384
    assert models["tiny-classifier"].versions[0] == "2"
    assert models["minilm-sentiment"].labels == ["positive", "negative", "neutral"]


def test_every_service_is_healthy_and_reflects(cluster: Cluster) -> None:
    for replica in cluster.all():
        with grpc.insecure_channel(replica.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, replica.service
    with grpc.insecure_channel(cluster.address("gateway")) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert "fmserve.v1.Gateway" in names


def test_tritonclient_talks_to_the_inference_service(cluster: Cluster) -> None:
    client = triton.InferenceServerClient(cluster.address("inference"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("minilm-embed")
    names = {m["name"] for m in client.get_model_repository_index(as_json=True)["models"]}
    assert {"minilm-embed", "tiny-ner"} <= names
    metadata = client.get_model_metadata("minilm-embed", as_json=True)
    assert "input_ids" in {i["name"] for i in metadata["inputs"]}
    client.close()


def test_request_id_follows_the_request_through_every_hop(
    cluster: Cluster, gateway_address: str
) -> None:
    request_id = uuid.uuid4().hex
    with grpc.insecure_channel(gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = gateway_pb2.InferRequest(model="minilm-embed", texts=[unique("traced")])
        stub.Infer(request, timeout=30, metadata=[("x-request-id", request_id)])
    for service in ("gateway", "preprocess", "inference", "postprocess"):
        log = cluster.replicas_of[service][0].log_path.read_text()
        assert request_id in log, service


def test_killed_stage_gives_unavailable_then_recovers(cluster: Cluster, client: Client) -> None:
    postprocess = cluster.replicas_of["postprocess"][0]
    assert postprocess.process is not None
    restarts = postprocess.restarts  # the session's cluster: other tests may have restarted it
    postprocess.process.kill()
    postprocess.process.wait()
    started = time.monotonic()
    with pytest.raises(Unavailable, match="postprocess"):
        Client(cluster.address("gateway"), timeout=10).embed([unique("while down")])
    assert time.monotonic() - started < 10
    cluster.supervise_once()
    cluster.wait_healthy(postprocess, time.monotonic() + 60)
    assert _serves_within(client, seconds=3), "the gateway did not reach the restarted stage"
    assert postprocess.restarts == restarts + 1


def _serves_within(client: Client, seconds: float) -> bool:
    """The gateway reconnects to a restarted stage within its reconnect backoff (1 s)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return client.embed([unique("after restart")]).shape == (1, 384)
        except Unavailable:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)


def _files(repository: Path, model: str) -> Path:
    return ModelRepository(repository).get(model).files()
