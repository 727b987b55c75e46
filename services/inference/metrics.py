"""Prometheus metrics of the inference service (`fmserve_inference_*`, labelled by model name).
Created once per process: Prometheus refuses a name registered twice."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from fmserve.core.metrics import LATENCY_BUCKETS, SIZE_BUCKETS

BATCH_SIZE = Histogram(
    "fmserve_inference_batch_size",
    "Sequences in one forward pass, by model.",
    ["model"],
    buckets=SIZE_BUCKETS,
)
QUEUE_DELAY = Histogram(
    "fmserve_inference_queue_delay_seconds",
    "Time a sequence waited in its model's batcher before its forward pass started.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
COMPUTE_DURATION = Histogram(
    "fmserve_inference_compute_duration_seconds",
    "Time of one batch: padding, forward pass, pooling and copies back, by model.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
MODEL_LOADS = Counter(
    "fmserve_inference_model_loads_total",
    "Model version lifecycle events, by model and event (loaded, failed, unloaded, evicted).",
    ["model", "event"],
)
HEAP_TRIMS = Counter(
    "fmserve_inference_heap_trims_total",
    "Times freed heap memory was handed back to the OS after the models went idle.",
)
HEAP_RELEASED = Counter(
    "fmserve_inference_heap_released_bytes_total",
    "Resident memory those trims gave back to the OS.",
)
