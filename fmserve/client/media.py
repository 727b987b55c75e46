"""Images and audio as the client sends them: encoded bytes with their MIME type, never model
tensors. An item may be
- a path: an image (.jpg, .jpeg, .png, .webp) or an audio file (.wav, .flac);
- encoded bytes: JPEG, PNG, WebP, WAV or FLAC, the type read from their signature;
- a PIL image: encoded here as PNG (lossless; PIL is not imported: any object with PIL's
  `save(fp, format=)` will do);
- a numpy waveform, [samples] or [samples, channels], sent as raw float32 PCM with the
  `sample_rate` the call names (the preprocess service resamples it to the model's rate)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from fmserve.v1 import common_pb2

Item = str | os.PathLike[str] | bytes | np.ndarray | Any
"""A path, encoded bytes, a PIL image, or a numpy waveform."""

SUFFIXES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".wav": "audio/wav",
    ".flac": "audio/flac",
}


def to_wire(item: Item, sample_rate: int = 0) -> common_pb2.Media:
    if isinstance(item, bytes):
        return common_pb2.Media(mime_type=sniff(item), data=item)
    if isinstance(item, (str, os.PathLike)):
        data = Path(item).read_bytes()
        return common_pb2.Media(mime_type=sniff(data) or SUFFIXES.get(_suffix(item), ""), data=data)
    if isinstance(item, np.ndarray):
        return waveform_to_wire(item, sample_rate)
    if hasattr(item, "save"):
        buffer = io.BytesIO()
        item.save(buffer, format="PNG")
        return common_pb2.Media(mime_type="image/png", data=buffer.getvalue())
    raise TypeError(
        f"a media item is a path, bytes, a PIL image or a numpy waveform, not {type(item).__name__}"
    )


def waveform_to_wire(waveform: np.ndarray, sample_rate: int) -> common_pb2.Media:
    """[samples] or [samples, channels] of any real dtype, as little-endian float32 PCM."""
    if sample_rate <= 0:
        raise ValueError("a numpy waveform needs its rate: pass sample_rate= (samples per second)")
    if waveform.ndim not in (1, 2) or waveform.size == 0:
        raise ValueError(
            f"a waveform is [samples] or [samples, channels] and not empty; got shape "
            f"{list(waveform.shape)}"
        )
    return common_pb2.Media(
        mime_type="audio/pcm",
        data=np.ascontiguousarray(waveform, dtype="<f4").tobytes(),
        sample_rate=sample_rate,
        channels=1 if waveform.ndim == 1 else waveform.shape[1],
        sample_format="f32le",
    )


def items_to_wire(items: Item | Sequence[Item], sample_rate: int = 0) -> list[common_pb2.Media]:
    """One item, or a sequence of them: a str, bytes, PIL image or numpy array is one item
    (a 2-D array is one clip's channels, not several clips: pass a list for several)."""
    return [to_wire(item, sample_rate) for item in each(items)]


def is_one(items: object) -> bool:
    """Whether `items` is one media item rather than a collection of them."""
    return isinstance(items, (str, bytes, os.PathLike, np.ndarray)) or hasattr(items, "save")


def each(items: Item | Iterable[Item]) -> Iterable[Item]:
    """The items: one item as a list of it, a collection as it is."""
    return [items] if is_one(items) else cast(Iterable[Item], items)


def sniff(data: bytes) -> str:
    """The MIME type the bytes' signature names; "" when none is known (the gateway's
    preprocess service then says what it takes)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE":
        return "audio/wav"
    if data.startswith(b"fLaC"):
        return "audio/flac"
    return ""


def kind_of_path(argument: str) -> str:
    """ "image" or "audio" when a command-line argument names such a file (an existing file
    with an image or audio suffix), "" for a text."""
    mime_type = SUFFIXES.get(_suffix(argument), "")
    if not mime_type or not Path(argument).is_file():
        return ""
    return mime_type.split("/")[0]


def _suffix(path: str | os.PathLike[str]) -> str:
    return Path(path).suffix.lower()
