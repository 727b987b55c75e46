"""A media item (image or audio clip) as the gateway handles it: its encoded bytes, what they
are, and a digest that names them in cache keys and in the table of work in flight."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

from fmserve.v1 import common_pb2


@dataclass(frozen=True)
class Media:
    mime_type: str
    data: bytes
    sample_rate: int = 0
    channels: int = 0
    sample_format: str = ""

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the bytes and everything that says how to read them."""
        head = f"{self.mime_type}\x00{self.sample_rate}\x00{self.channels}\x00{self.sample_format}"
        return hashlib.sha256(head.encode() + b"\x00" + self.data).hexdigest()


def media_problem(item: Media) -> str | None:
    """Why no model can take this item ("is empty: …"), or None; preprocess checks the rest
    (the MIME type against the model, the bytes themselves)."""
    if not item.data:
        return "is empty: send the encoded bytes"
    if not item.mime_type:
        return (
            "has no mime_type: say what the bytes are (image/jpeg, image/png, image/webp, "
            "audio/wav, audio/flac, or audio/pcm with its sample_rate)"
        )
    return None


def media_to_wire(media: Media) -> common_pb2.Media:
    return common_pb2.Media(
        mime_type=media.mime_type,
        data=media.data,
        sample_rate=media.sample_rate,
        channels=media.channels,
        sample_format=media.sample_format,
    )
