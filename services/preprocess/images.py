"""Decoding image items: encoded bytes (JPEG, PNG, WebP) → an upright RGB PIL image, within a
byte limit and a pixel limit (against decompression bombs: a few KB of PNG can declare
gigapixels). Pillow's errors become InvalidInput here, naming the item and the problem."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from fmserve.errors import InvalidInput

FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
"""The MIME types accepted, and the one Pillow format each may be decoded as."""
# What Pillow raises for bytes it cannot decode: unidentified, truncated, malformed chunks.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    """Most encoded bytes of one image."""
    max_pixels: int
    """Most pixels (width x height) of one image, checked from its header before decoding."""


def decode_image(data: bytes, mime_type: str, limits: ImageLimits, name: str) -> Image.Image:
    """The image `name` (e.g. "media[3]") as RGB, rotated as its EXIF orientation says."""
    _check_envelope(data, mime_type, limits, name)
    try:
        image = Image.open(io.BytesIO(data), formats=[FORMATS[mime_type]])
        _check_pixels(image, limits, name)
        image.load()
        upright = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"{name} has too many pixels to decode safely: {exc}") from None
    except _DECODE_ERRORS as exc:
        raise InvalidInput(
            f"{name} is not a readable {mime_type} image (corrupt or truncated): {exc}"
        ) from None
    return to_rgb(upright)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, transparency composited onto white (as Hugging Face's processors do), so a
    transparent background is not read as black."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _check_envelope(data: bytes, mime_type: str, limits: ImageLimits, name: str) -> None:
    if mime_type not in FORMATS:
        raise InvalidInput(
            f"{name} has MIME type {mime_type!r}, which this model does not take; send one of "
            f"{', '.join(FORMATS)}"
        )
    if not data:
        raise InvalidInput(f"{name} is empty: send the image's encoded bytes")
    if len(data) > limits.max_bytes:
        raise InvalidInput(
            f"{name} is {len(data)} bytes; the limit is {limits.max_bytes}: send a smaller image"
        )


def _check_pixels(image: Image.Image, limits: ImageLimits, name: str) -> None:
    pixels = image.width * image.height
    if pixels > limits.max_pixels:
        raise InvalidInput(
            f"{name} is {image.width}x{image.height} pixels ({pixels}); the limit is "
            f"{limits.max_pixels}: scale it down before sending"
        )
