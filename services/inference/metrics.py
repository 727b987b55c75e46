"""Prometheus metrics of the inference service (`fmserve_inference_*`, labelled by model name).
Created once per process: Prometheus refuses a name registered twice."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from fmserve.core.batching import Batcher
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
MODEL_STATE = Gauge(
    "fmserve_inference_model_state",
    "1 for a model version's current state (LOADING, WARMING, READY, UNLOADING, FAILED, "
    "UNAVAILABLE), 0 for the others.",
    ["model", "version", "state"],
)
MODEL_MEMORY = Gauge(
    "fmserve_inference_model_memory_bytes",
    "Memory a loaded model version's weights take, measured at its load.",
    ["model", "version"],
)
WARMUP_DURATION = Histogram(
    "fmserve_inference_warmup_duration_seconds",
    "Time a model version spent in its warm-up before it was READY, by model.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
HEAP_TRIMS = Counter(
    "fmserve_inference_heap_trims_total",
    "Times freed heap memory was handed back to the OS after the models went idle.",
)
HEAP_RELEASED = Counter(
    "fmserve_inference_heap_released_bytes_total",
    "Resident memory those trims gave back to the OS.",
)


class _QueuedSequences:
    """`fmserve_inference_queued_sequences`: sequences waiting in each model's batcher for a
    forward pass, read from the batchers when Prometheus scrapes (nothing on the request path).
    The inference autoscaler's signal (deploy/k8s/): a queue that stays longer than a couple of
    batches means this replica's forward passes cannot keep up."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # scrapes run in the /metrics thread
        self._batchers: weakref.WeakKeyDictionary[Batcher[Any, Any], str] = (
            weakref.WeakKeyDictionary()
        )

    def watch(self, batcher: Batcher[Any, Any], model: str) -> None:
        with self._lock:
            self._batchers[batcher] = model

    def forget(self, batcher: Batcher[Any, Any]) -> None:
        with self._lock:
            self._batchers.pop(batcher, None)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "fmserve_inference_queued_sequences",
            "Sequences waiting in a model's batcher for a forward pass, by model.",
            labels=["model"],
        )
        with self._lock:
            watched = list(self._batchers.items())
        depths: dict[str, int] = {}
        for batcher, model in watched:  # versions of one model add up
            depths[model] = depths.get(model, 0) + batcher.queued
        for model, depth in sorted(depths.items()):
            family.add_metric([model], depth)
        yield family


QUEUED_SEQUENCES = _QueuedSequences()
REGISTRY.register(QUEUED_SEQUENCES)

# Text generation (services/inference/generation/), per model.
TIME_TO_FIRST_TOKEN = Histogram(
    "fmserve_inference_time_to_first_token_seconds",
    "From a generation request's arrival to its first token: admission wait and prefill.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "fmserve_inference_inter_token_latency_seconds",
    "Time between two consecutive tokens of one sequence.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
TOKENS_GENERATED = Counter(
    "fmserve_inference_generated_tokens_total",
    "Tokens generated, by model.",
    ["model"],
)
SEQUENCES_ACTIVE = Gauge(
    "fmserve_inference_sequences_active",
    "Sequences being decoded (admitted, holding KV cache), by model.",
    ["model"],
)
SEQUENCES_WAITING = Gauge(
    "fmserve_inference_sequences_waiting",
    "Sequences waiting for room in the KV-cache budget, by model.",
    ["model"],
)
KV_TOKENS = Gauge(
    "fmserve_inference_kv_cache_tokens",
    "KV-cache entries held by the running sequences (padding excluded), by model.",
    ["model"],
)
KV_TOKENS_RESERVED = Gauge(
    "fmserve_inference_kv_cache_reserved_tokens",
    "KV-cache tokens reserved by the running sequences (prompt + max_new_tokens each), of the "
    "model's [generation] max_batch_tokens.",
    ["model"],
)
DECODE_STEP_DURATION = Histogram(
    "fmserve_inference_decode_step_duration_seconds",
    "Time of one decoding step of every running sequence together, by model.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
