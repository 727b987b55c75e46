"""Image decoding and the processor steps: PIL-drawn images in every format and mode, held to
Hugging Face's own processors (their PIL backend) within 1e-5, and every bad image refused with
InvalidInput naming the item."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from fmserve.errors import InvalidInput
from services.preprocess.image_processor import ImageProcessor
from services.preprocess.images import ImageLimits, decode_image
from tests.images import drawn, encoded
from tests.models import CLIP_PROCESSOR, VIT_PROCESSOR

LIMITS = ImageLimits(max_bytes=1_000_000, max_pixels=1_000_000)
PROCESSORS = {
    "vit-224": (ViTImageProcessorPil(), None),
    "vit-tiny": (ViTImageProcessorPil(**VIT_PROCESSOR), VIT_PROCESSOR),
    "clip-224": (CLIPImageProcessorPil(), None),
    "clip-tiny": (CLIPImageProcessorPil(**CLIP_PROCESSOR), CLIP_PROCESSOR),
}
SIZES = [(70, 50), (50, 70), (224, 224), (20, 15), (301, 97)]


@pytest.mark.parametrize("name", PROCESSORS)
@pytest.mark.parametrize("size", SIZES)
def test_processor_steps_match_hugging_face(name: str, size: tuple[int, int]) -> None:
    reference, config = PROCESSORS[name]
    image = drawn(*size, seed=sum(size))
    ours = ImageProcessor.from_config(config or reference.to_dict())(image)
    expected = reference(image, return_tensors="np")["pixel_values"][0]
    assert ours.dtype == np.float32
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_a_crop_bigger_than_the_image_pads_as_hugging_face_does() -> None:
    config = {**CLIP_PROCESSOR, "size": {"height": 20, "width": 24}}
    image = drawn(31, 17)
    ours = ImageProcessor.from_config(config)(image)
    expected = CLIPImageProcessorPil(**config)(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("mime_type", "format", "options"),
    [
        ("image/png", "PNG", {}),
        ("image/jpeg", "JPEG", {"quality": 95}),
        ("image/webp", "WEBP", {"lossless": True}),
    ],
)
def test_decodes_each_format_to_the_pixels_pillow_reads(
    mime_type: str, format: str, options: dict[str, object]
) -> None:
    data = encoded(drawn(), format, **options)
    image = decode_image(data, mime_type, LIMITS, "media[0]")
    assert image.mode == "RGB" and image.size == (70, 50)
    reference = Image.open(io.BytesIO(data)).convert("RGB")
    np.testing.assert_array_equal(np.asarray(image), np.asarray(reference))


def test_exif_orientation_turns_the_image_upright() -> None:
    upright = drawn(70, 50)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a camera held sideways stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to view
    data = encoded(stored, "JPEG", quality=100, exif=exif)
    image = decode_image(data, "image/jpeg", LIMITS, "media[0]")
    assert image.size == (70, 50)
    difference = np.abs(np.asarray(image, float) - np.asarray(upright, float)).mean()
    assert difference < 4  # JPEG's own loss, not a rotated image (which differs by ~100)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "CMYK"])
def test_every_mode_becomes_rgb_as_hugging_face_converts_it(mode: str) -> None:
    source = drawn(mode=mode) if mode in ("RGBA", "L", "P") else drawn().convert(mode)
    format = "JPEG" if mode == "CMYK" else "PNG"
    data = encoded(source, format)
    image = decode_image(data, "image/jpeg" if format == "JPEG" else "image/png", LIMITS, "x")
    assert image.mode == "RGB"
    reference = ViTImageProcessorPil(**VIT_PROCESSOR, do_convert_rgb=True)
    expected = reference(Image.open(io.BytesIO(data)), return_tensors="np")
    ours = ImageProcessor.from_config(VIT_PROCESSOR)(image)
    np.testing.assert_allclose(ours, expected["pixel_values"][0], atol=1e-5, rtol=0)


def test_transparency_is_composited_onto_white() -> None:
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image = decode_image(encoded(clear), "image/png", LIMITS, "media[0]")
    assert np.asarray(image).min() == 255


def _png() -> bytes:
    return encoded(drawn())


BAD = {
    "corrupt": (b"\x89PNG\r\n\x1a\n" + bytes(range(200)), "image/png", "not a readable"),
    "truncated": (_png()[:300], "image/png", "corrupt or truncated"),
    "not what it says": (_png(), "image/jpeg", "not a readable image/jpeg"),
    "unsupported type": (_png(), "image/gif", "MIME type 'image/gif'"),
    "no type": (_png(), "", "MIME type ''"),
    "empty": (b"", "image/png", "is empty"),
    "too large": (b"x" * (LIMITS.max_bytes + 1), "image/png", "the limit is 1000000"),
    "too many pixels": (encoded(Image.new("L", (2000, 1000))), "image/png", "2000x1000 pixels"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_images_are_refused_naming_the_item(case: str) -> None:
    data, mime_type, problem = BAD[case]
    with pytest.raises(InvalidInput) as raised:
        decode_image(data, mime_type, LIMITS, "media[3]")
    assert raised.value.message.startswith("media[3] ")
    assert problem in raised.value.message


def test_a_decompression_bomb_is_refused_before_its_pixels_are_decoded() -> None:
    # 48 megapixels of one colour compress to ~50 KB; decoding them would take 144 MB as RGB
    bomb = encoded(Image.new("L", (8000, 6000)), "PNG")
    limits = ImageLimits(max_bytes=len(bomb), max_pixels=40_000_000)
    with pytest.raises(InvalidInput, match=r"^media\[0\] is 8000x6000 pixels"):
        decode_image(bomb, "image/png", limits, "media[0]")


def test_a_config_without_a_size_is_refused() -> None:
    with pytest.raises(ValueError, match="size needs height and width, or shortest_edge"):
        ImageProcessor.from_config({"do_resize": True})
