"""Preprocess service settings (`FMSERVE_PREPROCESS_*`, plus `FMSERVE_MODEL_REPOSITORY`)."""

from __future__ import annotations

from pydantic import PositiveFloat, PositiveInt
from pydantic_settings import SettingsConfigDict

from fmserve.core.settings import PreloadSettings, RepositorySettings, WorkerSettings


class PreprocessSettings(RepositorySettings, PreloadSettings, WorkerSettings):
    # validate_by_name: tests and tools may pass `model_repository=` beside the env alias.
    model_config = SettingsConfigDict(
        env_prefix="FMSERVE_PREPROCESS_", extra="ignore", validate_by_name=True
    )

    port: int = 50052
    """gRPC port of the preprocess service."""
    tokenizer_threads: PositiveInt = 2
    """Worker threads that load tokenizers and tokenize, so the event loop never waits on them.
    Each batch is also split across cores inside the Rust tokenizer, so a few suffice."""
    media_threads: PositiveInt = 2
    """Worker threads that decode and featurize media (images, audio), off the event loop."""
    max_image_bytes: PositiveInt = 16 * 1024 * 1024
    """Most encoded bytes of one image; a bigger one is refused (INVALID_ARGUMENT)."""
    max_image_pixels: PositiveInt = 40_000_000
    """Most pixels (width x height) of one image, checked from its header before decoding: a
    small file can declare gigapixels (a decompression bomb). Keep it under Pillow's own limit
    (89 million), over which Pillow warns."""
    max_audio_bytes: PositiveInt = 16 * 1024 * 1024
    """Most bytes in one audio clip as sent (WAV, FLAC or raw PCM); larger ones are refused
    before decoding. 16 MiB holds about 8 minutes of 16-bit mono at 16 kHz."""
    max_audio_s: PositiveFloat = 600.0
    """Most seconds in one audio clip, read from its header before decoding; a model's own
    max_length (samples at its rate) may refuse shorter ones."""
