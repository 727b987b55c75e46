"""`python -m services.inference`: serve the model repository over the KServe v2 protocol."""

from __future__ import annotations

import os

from fmserve.rpc import service
from fmserve.rpc.service import Service
from services.inference.settings import InferenceSettings


def build(settings: InferenceSettings) -> Service:
    """Wire the inference service; the registry (a Resource) stops every batcher on stop."""
    # Imported here, not above: these import torch, which must come after main() has set
    # OpenMP's environment.
    from fmserve.core.watch import RepositoryWatcher
    from services.inference import onnx_backend
    from services.inference.loading import configure_threads
    from services.inference.registry import ModelRegistry
    from services.inference.server import servicer
    from services.inference.worker import worker_resources

    configure_threads(settings.torch_threads, settings.torch_interop_threads)
    onnx_backend.configure_threads(
        settings.torch_threads,
        settings.torch_interop_threads,
        spinning=settings.omp_wait_policy == "ACTIVE",
    )
    watcher = RepositoryWatcher.of(settings)
    registry = ModelRegistry(
        watcher.repository,
        max_loaded_models=settings.max_loaded_models,
        preload=settings.preload_models,
        grace_s=settings.grace_period_s,
        heap_trim_idle_s=settings.heap_trim_idle_s,
        memory_budget_mb=settings.memory_budget_mb,
        idle_unload_s=settings.idle_unload_s,
    )
    # The queue worker starts after the registry (preloads done) and stops before it.
    resources = [watcher, registry, *worker_resources(settings, registry)]
    return Service("inference", settings, [servicer(registry)], resources=resources)


def main() -> None:
    settings = InferenceSettings()
    # OpenMP reads these once, when torch first loads it, so they are set before anything
    # imports torch. The policy's trade-offs are measured in the README ("Performance").
    if settings.omp_wait_policy == "DEFAULT":
        os.environ.pop("OMP_WAIT_POLICY", None)  # OpenMP's own: spin briefly, then sleep
    else:
        os.environ["OMP_WAIT_POLICY"] = settings.omp_wait_policy
    os.environ["OMP_NUM_THREADS"] = str(settings.torch_threads)
    service.main(settings, build, "inference")


if __name__ == "__main__":
    main()
