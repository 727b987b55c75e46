"""Inference settings (`FMSERVE_INFERENCE_*`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from fmserve.core.settings import PreloadSettings, RepositorySettings, WorkerSettings


class InferenceSettings(RepositorySettings, PreloadSettings, WorkerSettings):
    model_config = SettingsConfigDict(env_prefix="FMSERVE_INFERENCE_", extra="ignore")

    port: int = 50053
    """gRPC port of the KServe v2 / Triton protocol."""
    torch_threads: int = Field(2, ge=1)
    """Intra-op threads of one forward pass, torch's and onnxruntime's sessions'. Two served
    40% more than one at concurrency 32 on a 2-core machine shared with the other services
    (bench/)."""
    torch_interop_threads: int = Field(1, ge=1)
    """Inter-op threads (parallel operators of one graph), torch's and onnxruntime's; encoders
    gain nothing from more."""
    omp_wait_policy: Literal["DEFAULT", "PASSIVE", "ACTIVE"] = "DEFAULT"
    """Torch's OpenMP threads between parallel regions: DEFAULT spins briefly, then sleeps
    (OpenMP's own policy); PASSIVE sleeps at once; ACTIVE spins. With each version on its own
    thread, DEFAULT cut MiniLM's lone forward pass from 12 to 8-10 ms and served 4-14% more
    at concurrency 32 than PASSIVE (bench/), at more CPU and a higher p99 for lone requests;
    choose PASSIVE on a host shared with CPU-bound processes, where brief spins cost them.
    onnxruntime's sessions spin under ACTIVE only."""
    job_max_sequences: int = Field(8, ge=1)
    """Most sequences of text-generation jobs this replica generates at once, over all models.
    The scheduler admits sequences first come, first served, with no priorities: this bound
    keeps the rest of a model's [generation] max_sequences for streams (Generate)."""
    max_loaded_models: int = Field(8, ge=1)
    """Most model versions loaded at once; loading one more unloads the least recently used
    idle one (RESOURCE_EXHAUSTED when none is idle)."""
    memory_budget_mb: float = Field(0.0, ge=0)
    """Most memory the loaded versions' weights may take together, in MB (each measured at its
    load). Loading one more first unloads the least recently used idle versions that are not
    pinned; when none can go, the load is refused with RESOURCE_EXHAUSTED. 0: no budget."""
    idle_unload_s: float = Field(0.0, ge=0)
    """A version unused this long unloads by itself (a pinned one never); a model's model.toml
    `[lifecycle] idle_unload_s` overrides it. 0: never."""
    heap_trim_idle_s: float = Field(1.0, ge=0)
    """Once no model has run a batch for this long, hand the memory that the work freed back to
    the OS (glibc's malloc_trim, about 20 ms off the event loop). Without it every overload
    burst left the process 50-200 MB larger than it uses. 0: never."""
