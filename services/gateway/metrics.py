"""The gateway's own Prometheus metrics (request counts and latencies come from
fmserve.core.metrics). Created once at import: Prometheus refuses to register a name twice."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
NEAR_HITS = Counter(
    "fmserve_gateway_near_cache_hits_total",
    "Result cache hits answered from the gateway's own memory, per text (counted as hits in "
    "fmserve_gateway_cache_lookups_total too).",
    ["model"],
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

# Per version: labels are versions the repository has (a request's version is checked before it
# is counted), so they stay as few as the versions kept.
VERSION_REQUESTS = Counter(
    "fmserve_gateway_version_requests_total",
    "Infer and Generate calls answered per model version, by outcome (ok, error); the caller's "
    "own mistakes (INVALID_ARGUMENT) are not counted against a version.",
    ["model", "version", "outcome"],
)
VERSION_LATENCY = Histogram(
    "fmserve_gateway_version_request_duration_seconds",
    "Time to answer an Infer call (a whole Generate stream), per model version.",
    ["model", "version"],
    buckets=LATENCY_BUCKETS,
)
TRAFFIC_SHARE = Gauge(
    "fmserve_gateway_traffic_share_percent",
    "Percent of a model's unpinned requests its traffic policy sends each version.",
    ["model", "version"],
)
SHADOW_REQUESTS = Counter(
    "fmserve_gateway_shadow_requests_total",
    "Copies of requests sent to a shadow version, by outcome (ok, error, dropped: too many "
    "copies in flight); their answers are never returned.",
    ["model", "version", "outcome"],
)
ROLLBACKS = Counter(
    "fmserve_gateway_rollbacks_total",
    "Traffic policies rolled back, by reason: requested (an admin), error_ratio or p99_latency "
    "(a guard broke). Counted once per rollback, by the replica that made it.",
    ["model", "reason"],
)
