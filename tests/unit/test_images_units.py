"""The image plumbing's pure parts: the repository's image keys, media routing and cache keys,
zero-shot scoring, the inference codec's pixel_values, the client's MIME sniffing, and the
featurizers' dispatch by task."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file
from tritonclient.grpc import service_pb2

from fmserve.client import media as client_media
from fmserve.core.repository import ModelRepository
from fmserve.core.tasks import TaskName
from fmserve.errors import ConfigError, InvalidInput, TooLarge, WrongTask
from fmserve.v1 import common_pb2
from services.gateway.cache_keys import cache_key, media_key
from services.gateway.media import Media
from services.gateway.pipeline import Pipeline
from services.gateway.routes import Route, Router
from services.gateway.settings import GatewaySettings
from services.gateway.stages import ModelOutputs, StageClients
from services.gateway.zero_shot import ZeroShot, check_labels, logit_scale
from services.inference.codec import to_domain
from services.preprocess.featurizers import Featurizers
from services.preprocess.media import MediaItem
from services.preprocess.settings import PreprocessSettings
from tests.images import drawn, encoded
from tests.models import VIT_PROCESSOR

pytestmark = pytest.mark.timeout(20)

CLIP_CONFIG = {"projection_dim": 4, "vision_config": {"image_size": 8}, "text_config": {}}


def write(root: Path, name: str, toml: str, config: dict[str, Any]) -> Path:
    folder = root / name / "1"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (root / name / "model.toml").write_text(toml)
    return folder


@pytest.fixture
def repository(tmp_path: Path) -> ModelRepository:
    vit = {"image_size": 16, "id2label": {"0": "cat", "1": "dog"}}
    folder = write(tmp_path, "vit", 'task = "image-classification"\n', vit)
    (folder / "preprocessor_config.json").write_text(json.dumps(VIT_PROCESSOR))
    toml = 'task = "image-embedding"\nlabels = ["a", "b"]\nlabel_prompt = "a photo of {}"\n'
    write(tmp_path, "clip", toml, CLIP_CONFIG)
    write(tmp_path, "text", 'task = "text-classification"\n', {"id2label": {"0": "x"}})
    write(tmp_path, "bare-vit", 'task = "image-classification"\n', vit)  # no processor config
    return ModelRepository(tmp_path)


# --- the repository ----------------------------------------------------------------------


def test_image_models_read_their_size_labels_and_prompt(repository: ModelRepository) -> None:
    vit, clip = repository.get("vit"), repository.get("clip")
    assert (vit.task, vit.image_size, vit.labels) == (
        TaskName.IMAGE_CLASSIFICATION,
        16,
        ("cat", "dog"),
    )
    assert (clip.image_size, clip.dimensions, clip.labels) == (8, 4, ("a", "b"))
    assert clip.label_prompt.format("cat") == "a photo of cat"


@pytest.mark.parametrize(
    ("toml", "config", "problem"),
    [
        ('task = "image-embedding"\nlabel_prompt = "photo"\n', CLIP_CONFIG, 'hold "{}" once'),
        ('task = "image-embedding"\n', {"projection_dim": 4}, "needs image_size"),
        ('task = "image-classification"\n', {"image_size": 8}, "needs labels"),
    ],
)
def test_an_unusable_image_model_is_a_config_error(
    tmp_path: Path, toml: str, config: dict[str, Any], problem: str
) -> None:
    write(tmp_path, "m", toml, config)
    with pytest.raises(ConfigError, match=problem):
        ModelRepository(tmp_path).get("m")


# --- routing and cache keys --------------------------------------------------------------


def test_media_routes_carry_the_featurized_size(repository: ModelRepository) -> None:
    router = Router(repository, max_items=2, max_text_chars=100)
    route = router.route("vit", "", None, False, 1, media=True)
    assert (route.media, route.item_bytes, route.top_k) == (True, 3 * 16 * 16 * 4, 1)
    assert router.route("clip", "", TaskName.EMBEDDING, False, 0).task is TaskName.IMAGE_EMBEDDING
    with pytest.raises(InvalidInput, match="takes images: send them as media"):
        router.route("vit", "", None, False, 0)
    with pytest.raises(InvalidInput, match="takes texts, not media"):
        router.route("text", "", None, False, 0, media=True)
    with pytest.raises(WrongTask):
        router.route("vit", "", TaskName.IMAGE_EMBEDDING, False, 0, media=True)


def test_media_checks_name_the_item(repository: ModelRepository) -> None:
    router = Router(repository, max_items=2, max_text_chars=100)
    with pytest.raises(InvalidInput, match=r"^media\[1\] is empty"):
        router.check_media([Media("image/png", b"x"), Media("image/png", b"")])
    with pytest.raises(InvalidInput, match=r"^media\[0\] has no mime_type"):
        router.check_media([Media("", b"x")])
    with pytest.raises(TooLarge, match="3 media items"):
        router.check_media([Media("image/png", b"x")] * 3)


ROUTE = Route("vit", "1", TaskName.IMAGE_CLASSIFICATION, media=True, item_bytes=3072)
IMAGE = Media("image/png", b"\x89PNG...")


@pytest.mark.parametrize(
    "changed",
    [
        (ROUTE, Media("image/png", b"\x89PNG..!")),
        (ROUTE, Media("image/jpeg", IMAGE.data)),
        (replace(ROUTE, version="2"), IMAGE),
        (replace(ROUTE, model="other"), IMAGE),
        (replace(ROUTE, top_k=2), IMAGE),
        (replace(ROUTE, task=TaskName.IMAGE_EMBEDDING), IMAGE),
    ],
    ids=["bytes", "mime", "version", "model", "top_k", "task"],
)
def test_media_keys_change_with_everything_that_changes_an_answer(
    changed: tuple[Route, Media],
) -> None:
    assert media_key(*changed) != media_key(ROUTE, IMAGE)
    assert media_key(ROUTE, Media("image/png", b"\x89PNG...")) == media_key(ROUTE, IMAGE)


def test_a_media_key_never_equals_a_text_key() -> None:
    assert media_key(ROUTE, IMAGE) != cache_key(ROUTE, IMAGE.digest)


# --- zero-shot ---------------------------------------------------------------------------


async def test_zero_shot_scores_with_the_logit_scale_and_embeds_each_label_set_once(
    repository: ModelRepository,
) -> None:
    scale = np.log(np.float32(10.0))
    save_file({"logit_scale": np.asarray(scale, dtype=np.float32)}, str(_clip(repository)))
    text_vectors = np.eye(4, dtype=np.float32)[:2]  # "a photo of a", "a photo of b"
    asked: list[list[str]] = []

    async def embed_texts(route: Route, texts: list[str], timeout: float) -> np.ndarray:
        asked.append(texts)
        return text_vectors

    zero_shot = ZeroShot(embed_texts)
    config = repository.get("clip")
    route = Route("clip", "1", TaskName.IMAGE_EMBEDDING, media=True)
    image = common_pb2.Result(embedding=common_pb2.Embedding(values=[0.6, 0.8, 0, 0]))
    for _ in range(2):
        (result,) = await zero_shot.classify(route, config, ["a", "b"], [image], 0, 5.0)
    assert asked == [["a photo of a", "a photo of b"]]
    logits = 10.0 * np.array([0.6, 0.8])
    expected = np.exp(logits) / np.exp(logits).sum()
    labels = result.classification.labels
    assert [s.label for s in labels] == ["b", "a"]
    np.testing.assert_allclose([s.score for s in labels], expected[::-1], rtol=1e-6)
    (cut,) = await zero_shot.classify(route, config, ["a", "b"], [image], 1, 5.0)
    assert len(cut.classification.labels) == 1
    with pytest.raises(InvalidInput, match="twice"):
        check_labels(["a", "b", "a"])
    with pytest.raises(InvalidInput, match=r"candidate_labels\[1\] is empty"):
        check_labels(["a", " "])


def test_a_model_without_a_logit_scale_cannot_do_zero_shot(tmp_path: Path) -> None:
    save_file({"other": np.zeros(1, dtype=np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="no logit_scale"):
        logit_scale(tmp_path, "m")


def _clip(repository: ModelRepository) -> Path:
    return repository.get("clip").files("1") / "model.safetensors"


# --- the inference codec -----------------------------------------------------------------


def _pixels_request(pixels: np.ndarray, **others: np.ndarray) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="vit")
    for name, array in {"pixel_values": pixels, **others}.items():
        datatype = "FP32" if array.dtype == np.float32 else "INT64"
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    return request


def test_pixel_values_become_one_array_per_image() -> None:
    pixels = np.random.default_rng(0).random((2, 3, 4, 4), dtype=np.float32)
    infer = to_domain(_pixels_request(pixels))
    assert len(infer.sequences) == 2
    np.testing.assert_array_equal(infer.sequences[1], pixels[1])


@pytest.mark.parametrize(
    ("pixels", "others", "problem"),
    [
        (np.zeros((2, 1, 4, 4), np.float32), {}, r"shape \[B, 3, H, W\]"),
        (np.full((1, 3, 2, 2), np.nan, np.float32), {}, "finite"),
        (np.zeros((1, 3, 2, 2), np.float32), {"input_ids": np.ones((1, 2), np.int64)}, "alone"),
    ],
)
def test_bad_pixel_values_are_invalid_input(
    pixels: np.ndarray, others: dict[str, np.ndarray], problem: str
) -> None:
    with pytest.raises(InvalidInput, match=problem):
        to_domain(_pixels_request(pixels, **others))


# --- the client --------------------------------------------------------------------------


def test_the_client_sniffs_the_type_from_the_bytes_then_the_suffix(tmp_path: Path) -> None:
    image = drawn(8, 8)
    for format, mime in (("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        assert client_media.to_wire(encoded(image, format)).mime_type == mime
    misnamed = tmp_path / "photo.jpg"
    misnamed.write_bytes(encoded(image, "PNG"))
    assert client_media.to_wire(misnamed).mime_type == "image/png"
    from_pil = client_media.to_wire(image)
    assert from_pil.mime_type == "image/png" and from_pil.data.startswith(b"\x89PNG")
    assert len(client_media.items_to_wire([misnamed, image])) == 2
    assert len(client_media.items_to_wire(b"\xff\xd8\xff...")) == 1
    with pytest.raises(TypeError, match="path, bytes, a PIL image or a numpy waveform"):
        client_media.to_wire(3)


# --- the featurizers ---------------------------------------------------------------------


async def test_featurizers_dispatch_by_task_and_say_what_is_missing(
    repository: ModelRepository,
) -> None:
    featurizers = Featurizers(repository, PreprocessSettings(model_repository=Path(".")))
    png = MediaItem("image/png", encoded(drawn(20, 10)))
    try:
        inputs = await featurizers.featurize("vit", "", [png, png])
        assert inputs["pixel_values"].shape == (2, 3, 32, 32)  # VIT_PROCESSOR's size
        with pytest.raises(WrongTask, match="takes texts, not media"):
            await featurizers.featurize("text", "", [png])
        with pytest.raises(ConfigError, match=r"no preprocessor_config\.json"):
            await featurizers.featurize("bare-vit", "", [png])
        with pytest.raises(InvalidInput, match=r"^media\[1\] .*image/png"):
            await featurizers.featurize("vit", "", [png, MediaItem("image/png", b"junk")])
    finally:
        await featurizers.stop()


# --- media batches fit the stages' messages ----------------------------------------------


@pytest.mark.parametrize(
    ("image_size", "batch"),
    [(224, 20), (384, 7), (1024, 1), (32, 64)],
    ids=["224: 602 KB each", "384: 1.7 MB each", "one alone however big", "text's limit"],
)
async def test_a_media_batch_holds_what_fits_max_media_batch_bytes(
    image_size: int, batch: int
) -> None:
    settings = GatewaySettings(max_batch_size=64, max_media_batch_bytes=12 * 1024 * 1024)
    pipeline = Pipeline(StageClients(settings), settings)
    route = replace(ROUTE, item_bytes=3 * image_size**2 * 4)
    assert pipeline._limits(route).max_batch_size == batch
    assert pipeline._limits(replace(route, media=False)).max_batch_size == 64


class _RecordingStages:
    """Stage clients that answer every media batch and record each batch's encoded bytes."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []
        """(items, encoded bytes) of each Featurize call."""

    async def featurize(self, route: Route, media: list[Media], timeout: float) -> dict:
        self.batches.append((len(media), sum(len(item.data) for item in media)))
        return {}

    async def infer_inputs(self, route: Route, inputs: dict, timeout: float, priority: int) -> Any:
        return ModelOutputs(common_pb2.Tensor())

    async def postprocess(self, route: Route, *rest: Any) -> list[common_pb2.Result]:
        return [common_pb2.Result() for _ in range(self.batches[-1][0])]


async def test_media_batches_are_bounded_by_their_encoded_bytes_too() -> None:
    """Long clips at a high rate weigh more encoded than featurized: the Featurize request
    carries them as sent, so a batch holds at most max_media_batch_bytes of them."""
    mb = 1024 * 1024
    settings = GatewaySettings(max_media_batch_bytes=12 * mb, max_batches_in_flight=1)
    stages = _RecordingStages()
    pipeline = Pipeline(stages, settings)  # type: ignore[arg-type]
    route = replace(ROUTE, item_bytes=1000)  # small once featurized: 12,582 would fit
    clips = [Media("audio/wav", bytes([i]) * 5 * mb) for i in range(5)]

    results = await pipeline.run(route, clips, deadline=time.monotonic() + 10)

    assert len(results) == 5
    assert stages.batches == [(2, 10 * mb), (2, 10 * mb), (1, 5 * mb)]  # not three: 15 MiB
    await pipeline.stop()
