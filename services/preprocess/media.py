"""A media item as the preprocess service sees it: encoded bytes and what they are, with the
name errors give it ("media[3]")."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MediaItem:
    mime_type: str
    data: bytes
    sample_rate: int = 0
    """audio/pcm only: samples per second per channel."""
    channels: int = 0
    """audio/pcm only: interleaved channels (0: 1)."""
    sample_format: str = ""
    """audio/pcm only: "s16le" (default) or "f32le"."""


def in_request(index: int) -> str:
    """How an error names the item at `index` of a Featurize request."""
    return f"media[{index}]"
