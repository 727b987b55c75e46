"""The gateway's own Prometheus metrics (request counts and latencies come from
fmserve.core.metrics). Created once at import: Prometheus refuses to register a name twice."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from fmserve.core.metrics import LATENCY_BUCKETS, SIZE_BUCKETS

BATCH_SIZE = Histogram(
    "fmserve_gateway_batch_size", "Texts per downstream batch.", ["model"], buckets=SIZE_BUCKETS
)
QUEUE_DELAY = Histogram(
    "fmserve_gateway_queue_delay_seconds",
    "Time a text waited in the gateway before its batch left.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
LOOKUPS = Counter(
    "fmserve_gateway_cache_lookups_total",
    "Result cache lookups per text, by outcome (hit, miss, error).",
    ["model", "outcome"],
)
LIMIT_REFUSALS = Counter(
    "fmserve_gateway_limit_refusals_total",
    "Calls refused by an API key's limits, by the key's name (never the key) and reason: rate, "
    "model_rate, concurrency, quota, or unavailable (the limits could not be checked).",
    ["key_name", "reason"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "fmserve_gateway_time_to_first_token_seconds",
    "Time from a Generate call's arrival to its first generated token.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "fmserve_gateway_inter_token_latency_seconds",
    "Time between consecutive generated tokens of one Generate stream.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
TOKENS_GENERATED = Counter(
    "fmserve_gateway_generated_tokens_total",
    "Tokens streamed to Generate callers (cache hits included).",
    ["model"],
)
