"""Prometheus metrics shared by every service: names follow `fmserve_<service>_<what>_<unit>`,
labels stay bounded (method, model, code; never a user or request id)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

# Latency buckets from 0.5 ms to 10 s: cache hits live at the bottom, cold batches at the top.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


# A model name becomes a label once a call for it has succeeded; until then (a typo, a name a
# client made up) it is counted as UNKNOWN_MODEL, so no client can grow /metrics. The bound is
# a last guard: a repository with more models than this labels the rest UNKNOWN_MODEL too.
UNKNOWN_MODEL = "unknown"
MAX_MODEL_LABELS = 256

# One pair of collectors per service name and process: Prometheus refuses to register a name
# twice, and a process may build the same service more than once (tests, a restart in place).
_RPC_COLLECTORS: dict[str, tuple[Counter, Histogram, Counter, Gauge]] = {}
_KNOWN_MODELS: dict[str, set[str]] = {}


class RpcMetrics:
    """Request count, latency and calls in flight per gRPC method (count and latency also per
    model and status code), for one service."""

    def __init__(self, service: str) -> None:
        if service not in _RPC_COLLECTORS:
            _RPC_COLLECTORS[service] = _rpc_collectors(service)
        self.requests, self.latency, self.retried, self.in_flight = _RPC_COLLECTORS[service]
        self.known_models = _KNOWN_MODELS.setdefault(service, set())

    def started(self, method: str) -> None:
        self.in_flight.labels(method).inc()

    def ended(self, method: str) -> None:
        self.in_flight.labels(method).dec()

    def observe(self, method: str, model: str, code: str, seconds: float) -> None:
        label = self.model_label(model, code)
        self.requests.labels(method, label, code).inc()
        self.latency.labels(method, label).observe(seconds)

    def model_label(self, model: str, code: str) -> str:
        """`-` for calls that name no model; the name once it has answered OK; else unknown."""
        if not model:
            return "-"
        if model in self.known_models:
            return model
        if code == "OK" and len(self.known_models) < MAX_MODEL_LABELS:
            self.known_models.add(model)
            return model
        return UNKNOWN_MODEL

    def observe_retry(self, method: str) -> None:
        self.retried.labels(method).inc()


def _rpc_collectors(service: str) -> tuple[Counter, Histogram, Counter, Gauge]:
    requests = Counter(
        f"fmserve_{service}_requests_total",
        "gRPC requests handled, by method, model and status code.",
        ["method", "model", "code"],
    )
    latency = Histogram(
        f"fmserve_{service}_request_duration_seconds",
        "Time to answer a gRPC request, by method and model.",
        ["method", "model"],
        buckets=LATENCY_BUCKETS,
    )
    # A client's retry policy marks each new attempt; the replica that answers it counts it, so
    # a replica that died mid-call shows up here even though its own metrics died with it.
    retried = Counter(
        f"fmserve_{service}_retried_requests_total",
        "Requests that arrived as a client's retry of a failed attempt (another replica, "
        "usually), by method.",
        ["method"],
    )
    # What the autoscalers read (deploy/k8s/): calls a replica holds right now, summed over the
    # replicas, over a target per replica. By method, so long-lived streams (WatchJob) can be
    # left out of the sum: they hold a call open without keeping the replica busy.
    in_flight = Gauge(
        f"fmserve_{service}_requests_in_flight",
        "gRPC calls this replica is handling now (received, not yet answered), by method.",
        ["method"],
    )
    return requests, latency, retried, in_flight


def serve_metrics(port: int, host: str = "0.0.0.0") -> int | None:
    """Start the /metrics HTTP endpoint in a daemon thread; returns the bound port (None if off)."""
    if port < 0:
        return None
    httpd, _ = start_http_server(port, addr=host)
    return int(httpd.server_port)
