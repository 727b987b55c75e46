"""Postprocess service settings (`FMSERVE_POSTPROCESS_*`, plus `FMSERVE_MODEL_REPOSITORY`)."""

from __future__ import annotations

from pydantic import NonNegativeInt, PositiveInt
from pydantic_settings import SettingsConfigDict

from fmserve.core.settings import RepositorySettings, WorkerSettings


class PostprocessSettings(RepositorySettings, WorkerSettings):
    # validate_by_name: tests and tools may pass `model_repository=` beside the env alias.
    model_config = SettingsConfigDict(
        env_prefix="FMSERVE_POSTPROCESS_", extra="ignore", validate_by_name=True
    )

    port: int = 50054
    """gRPC port of the postprocess service."""
    worker_threads: PositiveInt = 2
    """Threads that postprocess big batches, so the event loop keeps answering meanwhile."""
    offload_min_rows: NonNegativeInt = 128
    """Batches with at least this many output rows (texts; tokens for token classification) are
    postprocessed in a worker thread; smaller ones run inline, where handing them to a thread
    would cost more than the work (about 5 µs a row). 0: always in a thread."""
