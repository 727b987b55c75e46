"""The cache service's own Prometheus metrics (request counts and latencies come from
fmserve.core.metrics). Created once at import: Prometheus refuses to register a name twice."""

from __future__ import annotations

from prometheus_client import Counter

HITS = Counter("fmserve_cache_hits_total", "Looked-up keys that Redis held.")
MISSES = Counter("fmserve_cache_misses_total", "Looked-up keys that Redis did not hold.")
STORES = Counter("fmserve_cache_stores_total", "Results written to Redis.")
REDIS_ERRORS = Counter(
    "fmserve_cache_redis_errors_total",
    "Redis operations that failed, by operation (lookup, store, ping) and reason "
    "(unreachable, timeout, busy, refused).",
    ["operation", "reason"],
)
JOBS = Counter(
    "fmserve_cache_jobs_total",
    "Jobs entering a state (QUEUED on creation, RUNNING at its first recorded item, then a "
    "terminal state), by state.",
    ["state"],
)
ITEMS = Counter("fmserve_cache_job_items_total", "Job items recorded, by outcome.", ["outcome"])
