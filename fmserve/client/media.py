"""Images as the client sends them: encoded bytes with their MIME type, never pixels. An image
may be a path, its bytes, or a PIL image (encoded here as PNG, lossless; PIL is not imported:
any object with PIL's `save(fp, format=)` will do)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fmserve.v1 import common_pb2

Image = str | os.PathLike[str] | bytes | Any
"""A path, encoded bytes (JPEG, PNG, WebP), or a PIL image."""

SUFFIXES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


def to_wire(image: Image) -> common_pb2.Media:
    if isinstance(image, bytes):
        return common_pb2.Media(mime_type=sniff(image), data=image)
    if isinstance(image, (str, os.PathLike)):
        data = Path(image).read_bytes()
        return common_pb2.Media(
            mime_type=sniff(data) or SUFFIXES.get(_suffix(image), ""), data=data
        )
    if hasattr(image, "save"):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return common_pb2.Media(mime_type="image/png", data=buffer.getvalue())
    raise TypeError(f"an image is a path, bytes or a PIL image, not {type(image).__name__}")


def images_to_wire(images: Image | Sequence[Image]) -> list[common_pb2.Media]:
    """One image, or a sequence of them (a str or bytes is one image, not a sequence)."""
    if isinstance(images, (str, bytes, os.PathLike)) or hasattr(images, "save"):
        return [to_wire(images)]
    return [to_wire(image) for image in images]


def sniff(data: bytes) -> str:
    """The MIME type the bytes' signature names; "" when none is known (the gateway's
    preprocess service then says what it takes)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return ""


def is_image_path(argument: str) -> bool:
    """Whether a command-line argument names an image file (an existing file with an image
    suffix), as opposed to a text."""
    return _suffix(argument) in SUFFIXES and Path(argument).is_file()


def _suffix(path: str | os.PathLike[str]) -> str:
    return Path(path).suffix.lower()
