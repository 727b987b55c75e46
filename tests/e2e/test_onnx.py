"""ONNX Runtime as the second backend, end to end: versions written by `fmserve export` (the
function and the CLI) into a repository of this module's own, served by the five services as
processes beside the torch versions they came from.

    minilm-embed      1 torch (the bundled package)   2 ONNX fp32   3 ONNX int8 (the default)
    tiny-classifier   1 torch                          2 ONNX fp32
    tiny-ner          1 torch                          2 ONNX fp32
    broken-onnx       1 onnxruntime, a model.onnx that is not one
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from fmserve import Client
from fmserve.cli import main as cli
from fmserve.cli.cluster import Cluster
from fmserve.core.repository import ModelRepository
from fmserve.errors import Unavailable
from fmserve.export import COSINE_GATE
from fmserve.export.version import ExportRequest, export_version
from tests import reference
from tests.e2e.conftest import cluster_env, running_cluster
from tests.models import MINILM, build_classifier, build_token_classifier

# Two exports of MiniLM (~1 min on the loaded 2-core CPU) come before the first test.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Serving models on your own machines is cheaper with int8.",
    "Ada Lovelace lived in London.",
    "How do I reset my password?",
]


def _export(root: Path, model: str) -> str:
    return export_version(ExportRequest(model=model, repository=root), say=lambda _: None)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("onnx-models")
    bundled = Path(__file__).resolve().parents[2] / "models" / "minilm-embed"
    shutil.copytree(bundled, root / "minilm-embed")
    build_classifier(root / "tiny-classifier" / "1", seed=1)
    (root / "tiny-classifier" / "model.toml").write_text(
        'task = "text-classification"\nmax_length = 64\n'
    )
    build_token_classifier(root / "tiny-ner" / "1", seed=3)
    (root / "tiny-ner" / "model.toml").write_text(
        'task = "token-classification"\nmax_length = 64\n'
    )
    broken = root / "broken-onnx" / "1"
    shutil.copytree(root / "tiny-classifier" / "1", broken)
    (broken / "model.onnx").write_bytes(b"\x08\x07 not an ONNX graph")
    (root / "broken-onnx" / "model.toml").write_text(
        'task = "text-classification"\n[runtime]\nbackend = "onnxruntime"\n'
    )
    assert [_export(root, m) for m in ("minilm-embed", "tiny-classifier", "tiny-ner")] == ["2"] * 3
    args = ["export", "--model", "minilm-embed", "--format", "onnx", "--quantize", "int8"]
    assert cli([*args, "--repository", str(root)]) == 0
    return root


@pytest.fixture(scope="module")
def onnx_cluster(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    prefix = f"fmserve-e2e-onnx-{uuid.uuid4().hex[:8]}:"
    env = cluster_env(repository, prefix)
    with running_cluster(env, tmp_path_factory.mktemp("onnx-logs"), prefix) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(onnx_cluster: Cluster) -> Iterator[Client]:
    with Client(onnx_cluster.address("gateway"), timeout=60) as c:
        yield c


def test_the_exports_are_versions_of_the_same_models(repository: Path) -> None:
    config = ModelRepository(repository).get("minilm-embed")
    backends = {v: config.runtime_of(v).backend for v in sorted(config.versions)}
    assert backends == {"1": "torch", "2": "onnxruntime", "3": "onnxruntime"}
    report = json.loads((repository / "minilm-embed" / "3" / "quality.json").read_text())
    assert (report["precision"], report["metric"], report["passed"]) == ("int8", "cosine", True)
    assert report["value"] >= COSINE_GATE


def test_onnx_fp32_embeddings_equal_torch_fp32(client: Client) -> None:
    vectors = client.embed(SENTENCES, model="minilm-embed", version="2", cache="bypass")
    expected = reference.embed(MINILM, SENTENCES)
    assert vectors.shape == (4, 384)
    assert (vectors * expected).sum(axis=1).min() >= 0.9999


def test_the_int8_version_serves_as_the_default_within_its_gate(client: Client) -> None:
    vectors = client.embed(SENTENCES, model="minilm-embed", cache="bypass")
    explicit = client.embed(SENTENCES, model="minilm-embed", version="3", cache="bypass")
    assert np.allclose(vectors, explicit, atol=1e-6)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    cosines = (vectors * reference.embed(MINILM, SENTENCES)).sum(axis=1)
    assert cosines.mean() >= COSINE_GATE
    assert cosines.min() < 0.9999  # int8 indeed: not the fp32 graph


def test_an_onnx_classifier_agrees_with_its_torch_version(client: Client, repository: Path) -> None:
    texts = [*SENTENCES, "I love it.", "This is terrible."]
    answers = client.classify(texts, model="tiny-classifier", version="2", cache="bypass")
    expected = reference.classify(repository / "tiny-classifier" / "1", texts)
    labels = ModelRepository(repository).get("tiny-classifier").labels
    assert [a[0].label for a in answers] == [labels[i] for i in expected.argmax(axis=1)]
    for answer, probabilities in zip(answers, expected, strict=True):
        scores = {s.label: s.score for s in answer}
        assert np.allclose([scores[label] for label in labels], probabilities, atol=1e-5)


def test_an_onnx_token_classifier_finds_the_torch_versions_entities(client: Client) -> None:
    texts = ["Ada Lovelace lived in London and Paris.", "Berlin is far from Tokyo."]
    onnx = client.entities(texts, model="tiny-ner", version="2", cache="bypass")
    torch = client.entities(texts, model="tiny-ner", version="1", cache="bypass")
    assert [[(e.label, e.start, e.end) for e in row] for row in onnx] == [
        [(e.label, e.start, e.end) for e in row] for row in torch
    ]


def test_a_corrupt_model_onnx_fails_its_model_only(client: Client, onnx_cluster: Cluster) -> None:
    # the gateway says the stage is unavailable for it (retryable: the file may be fixed) ...
    with pytest.raises(Unavailable):
        client.classify(["a text"], model="broken-onnx", cache="bypass")
    # ... and the inference service says why, to the operator's tools
    triton_client = triton.InferenceServerClient(onnx_cluster.address("inference"))
    with pytest.raises(InferenceServerException) as caught:
        triton_client.load_model("broken-onnx")
    assert "UNAVAILABLE" in str(caught.value.status())
    assert "its model.onnx could not be loaded (corrupt or not an ONNX model?)" in str(caught.value)
    assert str(onnx_cluster.env["FMSERVE_MODEL_REPOSITORY"]) not in str(caught.value)
    index = triton_client.get_model_repository_index(as_json=True)["models"]
    broken = next(m for m in index if m["name"] == "broken-onnx")
    assert broken["state"] == "FAILED" and "model.onnx" in broken["reason"]
    triton_client.close()
    # the service lives on: other models (ONNX ones too) still answer
    assert client.classify(["still here"], model="tiny-classifier", version="2", cache="bypass")


def test_tritonclient_describes_an_onnx_version(onnx_cluster: Cluster) -> None:
    triton_client = triton.InferenceServerClient(onnx_cluster.address("inference"))
    onnx = triton_client.get_model_metadata("minilm-embed", "2", as_json=True)
    torch = triton_client.get_model_metadata("minilm-embed", "1", as_json=True)
    assert (onnx["platform"], torch["platform"]) == ("onnxruntime_onnx", "pytorch")
    assert [i["name"] for i in onnx["inputs"]] == ["input_ids", "attention_mask", "lengths"]
    assert onnx["outputs"][0]["name"] == "embeddings"
    config = triton_client.get_model_config("minilm-embed", "2", as_json=True)["config"]
    assert config["parameters"]["backend"]["string_value"] == "onnxruntime"
    assert triton_client.is_model_ready("minilm-embed", "3")  # preloaded: the default
    triton_client.close()


def test_an_export_below_the_gate_writes_nothing(
    repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = repository / "tiny-classifier"
    toml = (folder / "model.toml").read_text()
    args = ["export", "--model", "tiny-classifier", "--format", "onnx", "--quantize", "int8"]
    # agreement is at most 1: a gate above it refuses whatever the model
    assert cli([*args, "--min-agreement", "1.01", "--repository", str(repository)]) == 1
    out, err = capsys.readouterr()
    assert "gate agreement >= 1.01: FAILS" in out
    assert "version 3 not written" in err
    assert sorted(p.name for p in folder.iterdir()) == ["1", "2", "model.toml"]
    assert (folder / "model.toml").read_text() == toml
