"""The preprocess service's own Prometheus metrics (request counts and latencies come from
fmserve.core.metrics). Created once at import: Prometheus refuses to register a name twice."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

# From one short text to a full batch of long ones.
TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)

REQUEST_TOKENS = Histogram(
    "fmserve_preprocess_request_tokens",
    "Tokens produced per Tokenize request (all its texts, special tokens included), by model.",
    ["model"],
    buckets=TOKEN_BUCKETS,
)
TOKENIZER_LOADS = Counter(
    "fmserve_preprocess_tokenizer_loads_total",
    "Tokenizers loaded from a model's files, by model and outcome (ok, error).",
    ["model", "outcome"],
)
FEATURIZED_ITEMS = Counter(
    "fmserve_preprocess_featurized_items_total",
    "Media items (images, audio clips) decoded and featurized, by model.",
    ["model"],
)
