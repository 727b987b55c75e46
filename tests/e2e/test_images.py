"""Images end to end through the five services (the session's cluster): a ViT classifier and a
CLIP model built from configs, each answer held to the same model run in-process on the pixel
values of preprocess's own steps (which tests/unit/test_preprocess_images.py holds to Hugging
Face's processors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tritonclient.grpc as triton
from transformers import AutoTokenizer, CLIPModel, ViTForImageClassification

from fmserve import Client
from fmserve.cli import main as cli
from fmserve.cli.cluster import Cluster
from fmserve.errors import InvalidInput, TooLarge
from fmserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.preprocess.image_processor import ImageProcessor
from services.preprocess.images import ImageLimits, decode_image
from tests.images import drawn, encoded
from tests.models import IMAGE_LABELS

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

IMAGES = [
    encoded(drawn(70, 50, seed=1), "PNG"),
    encoded(drawn(48, 64, seed=2), "JPEG", quality=90),
    encoded(drawn(32, 32, seed=3), "WEBP", lossless=True),
    encoded(drawn(90, 40, mode="RGBA", seed=4), "PNG"),
]
LIMITS = ImageLimits(max_bytes=1 << 24, max_pixels=1 << 24)


@pytest.fixture(scope="module")
def client(gateway_address: str) -> Client:
    with Client(gateway_address, timeout=60) as client:
        yield client


def _pixels(folder: Path) -> torch.Tensor:
    processor = ImageProcessor.load(folder)
    rows = [processor(decode_image(data, _mime(data), LIMITS, "x")) for data in IMAGES]
    return torch.from_numpy(np.stack(rows))


def _mime(data: bytes) -> str:
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    return "image/webp" if data[8:12] == b"WEBP" else "image/png"


def test_vit_labels_and_scores_equal_the_model_in_process(
    client: Client, model_repository: Path
) -> None:
    folder = model_repository / "tiny-vit" / "1"
    model = ViTForImageClassification.from_pretrained(folder).eval()
    with torch.inference_mode():
        probs = model(pixel_values=_pixels(folder)).logits.softmax(-1).numpy()
    answers = client.classify_images(IMAGES, "tiny-vit", cache="bypass")
    assert len(answers) == len(IMAGES)
    for answer, expected in zip(answers, probs, strict=True):
        assert [s.label for s in answer] == [IMAGE_LABELS[i] for i in np.argsort(-expected)]
        by_label = {s.label: s.score for s in answer}
        got = [by_label[label] for label in IMAGE_LABELS]
        np.testing.assert_allclose(got, expected, atol=1e-4)
    assert len(client.classify_images(IMAGES[0], "tiny-vit", top_k=2)[0]) == 2


@pytest.fixture(scope="module")
def clip(model_repository: Path) -> tuple[CLIPModel, Path]:
    folder = model_repository / "tiny-clip" / "1"
    return CLIPModel.from_pretrained(folder).eval(), folder


def _text_embeds(model: CLIPModel, folder: Path, texts: list[str]) -> torch.Tensor:
    tokens = AutoTokenizer.from_pretrained(folder)(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        features = model.get_text_features(**tokens).pooler_output
    return F.normalize(features, dim=-1)


def _image_embeds(model: CLIPModel, folder: Path) -> torch.Tensor:
    with torch.inference_mode():
        features = model.get_image_features(pixel_values=_pixels(folder)).pooler_output
    return F.normalize(features, dim=-1)


def _cosines(a: np.ndarray, b: torch.Tensor) -> np.ndarray:
    b_np = b.numpy()
    return (a * b_np).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b_np, axis=-1)


def test_clip_image_and_text_embeddings_equal_the_model_in_process(
    client: Client, clip: tuple[CLIPModel, Path]
) -> None:
    model, folder = clip
    images = client.embed_images(IMAGES, "tiny-clip", cache="bypass")
    assert images.shape == (len(IMAGES), 16)
    np.testing.assert_allclose(np.linalg.norm(images, axis=-1), 1.0, atol=1e-5)
    assert _cosines(images, _image_embeds(model, folder)).min() >= 0.9999
    texts = ["a photo of a cat", "a drawing of a dog on a sofa", "fish"]
    vectors = client.embed(texts, "tiny-clip", cache="bypass")
    assert _cosines(vectors, _text_embeds(model, folder, texts)).min() >= 0.9999


@pytest.mark.parametrize("labels", [(), ("sky", "sea", "forest", "desert")])
def test_clip_zero_shot_labels_equal_the_softmax_in_process(
    client: Client, clip: tuple[CLIPModel, Path], labels: tuple[str, ...]
) -> None:
    model, folder = clip
    names = list(labels) or ["cat", "dog", "bird"]  # tiny-clip's model.toml labels
    texts = _text_embeds(model, folder, [f"a photo of a {name}" for name in names])
    logits = model.logit_scale.exp().item() * _image_embeds(model, folder) @ texts.T
    expected = logits.softmax(-1).numpy()
    answer = client.infer_media(IMAGES, "tiny-clip", task="image-classification", labels=labels)
    assert answer.task == "image-classification"
    for scores, row in zip(answer.results, expected, strict=True):
        assert [s.label for s in scores] == [names[i] for i in np.argsort(-row, kind="stable")]
        by_label = {s.label: s.score for s in scores}
        np.testing.assert_allclose([by_label[n] for n in names], row, atol=1e-4)


def test_the_same_bytes_are_answered_from_the_cache(client: Client) -> None:
    image = encoded(drawn(61, 47, seed=99), "PNG")
    first = client.infer_media([image], "tiny-vit", cache="refresh")
    again = client.infer_media([image], "tiny-vit")
    assert first.cached == [False] and again.cached == [True]
    assert again.results == first.results
    other = client.infer_media([encoded(drawn(61, 47, seed=98), "PNG")], "tiny-vit")
    assert other.cached == [False]
    # the cached CLIP embedding serves zero-shot with any labels
    client.embed_images([image], "tiny-clip", cache="refresh")
    zero_shot = client.infer_media([image], "tiny-clip", labels=["a", "b"])
    assert zero_shot.cached == [True] and len(zero_shot.results[0]) == 2


BAD = {
    "corrupt": (b"\x89PNG\r\n\x1a\n" + bytes(300), r"media\[1\] is not a readable image/png"),
    "truncated": (IMAGES[0][:200], r"media\[1\] is not a readable image/png .*truncated"),
    "unsupported": (b"GIF89a" + bytes(100), r"media\[1\] has no mime_type"),
    "empty": (b"", r"media\[1\] is empty"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_media_are_invalid_argument_naming_the_item(client: Client, case: str) -> None:
    data, message = BAD[case]
    with pytest.raises(InvalidInput, match=message):
        client.classify_images([IMAGES[0], data, IMAGES[1]], "tiny-vit", cache="bypass")


def test_wrong_kinds_of_input_are_refused_clearly(client: Client, gateway_address: str) -> None:
    with pytest.raises(InvalidInput, match="takes images: send them as media"):
        client.infer(["a text"], "tiny-vit")
    with pytest.raises(InvalidInput, match="takes texts, not media"):
        client.infer_media(IMAGES[:1], "tiny-classifier")
    with pytest.raises(InvalidInput, match="texts or media, not both"):
        _raw_infer(gateway_address, texts=["a text"], media=[common_pb2.Media(data=IMAGES[0])])
    with pytest.raises(TooLarge, match="media items in one request"):
        client.classify_images([IMAGES[2]] * 65, "tiny-vit")
    with pytest.raises(InvalidInput, match="candidate_labels"):
        client.infer_media(IMAGES[:1], "tiny-vit", labels=["x"])
    with pytest.raises(InvalidInput, match="holds a label twice"):
        client.classify_images(IMAGES[:1], "tiny-clip", labels=["cat", "dog", "cat"])


def _raw_infer(address: str, **fields: object) -> None:
    import grpc

    from fmserve.errors import from_rpc_error

    with grpc.insecure_channel(address) as channel:
        request = gateway_pb2.InferRequest(model="tiny-clip", **fields)  # type: ignore[arg-type]
        try:
            gateway_pb2_grpc.GatewayStub(channel).Infer(request, timeout=30)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None


def test_cli_classifies_an_image_file(
    gateway_address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(IMAGES[1])
    args = ["--address", gateway_address, "classify", "--model", "tiny-vit", "--json"]
    assert cli([*args, str(photo)]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["task"] == "image-classification"
    assert sorted(s["label"] for s in answer["results"][0]) == sorted(IMAGE_LABELS)
    args = ["--address", gateway_address, "classify", "--model", "tiny-clip", "--labels", "x,y"]
    assert cli([*args, str(photo)]) == 0
    assert "photo.jpg" in capsys.readouterr().out


def test_tritonclient_sees_the_pixel_values_input(cluster: Cluster) -> None:
    inference = triton.InferenceServerClient(cluster.address("inference"))
    vit = inference.get_model_metadata("tiny-vit", as_json=True)
    assert vit["inputs"] == [
        {"name": "pixel_values", "datatype": "FP32", "shape": ["-1", "3", "32", "32"]}
    ]
    assert vit["outputs"][0] == {"name": "logits", "datatype": "FP32", "shape": ["-1", "4"]}
    clip = inference.get_model_metadata("tiny-clip", as_json=True)
    assert [i["name"] for i in clip["inputs"]] == [
        "pixel_values",
        "input_ids",
        "attention_mask",
        "lengths",
    ]
    assert clip["outputs"][0]["shape"] == ["-1", "16"]
    config = inference.get_model_config("tiny-vit", as_json=True)["config"]
    assert config["input"][0]["dims"] == ["3", "32", "32"]
    # a Triton client's own request: the pixel values of preprocess's steps, logits back
    pixels = _pixels(Path(cluster.env["FMSERVE_MODEL_REPOSITORY"]) / "tiny-vit" / "1").numpy()
    request = triton.InferInput("pixel_values", list(pixels.shape), "FP32")
    request.set_data_from_numpy(pixels)
    logits = inference.infer("tiny-vit", [request]).as_numpy("logits")
    assert logits.shape == (len(IMAGES), len(IMAGE_LABELS))
    inference.close()
