"""Where a request's time and CPU go in the cluster: read from the services' own metrics and
from each process's CPU accounting over one load window, so that a benchmark can print, per
request, how long each hop held it and how many core-milliseconds each process spent.

    before = Snapshot.take(cluster)
    ... load ...
    Budget(before, Snapshot.take(cluster), requests).print()

The latency rows are means per call of the services' server-side histograms (sum / count), so
they add up the way the request flows: the client's latency holds the gateway's, which holds
its calls to preprocess, inference, postprocess and cache, and what is left at each level is
that level's own work plus the hops (serialisation, the network stack, waiting for a core).
The CPU rows are each process's user + system time (all its threads) over the window, per
request; with the machine's core count they say whether the cores were the limit."""

from __future__ import annotations

import os
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from fmserve.cli.cluster import SERVICES, Cluster

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# (label, service, histogram, method): the server-side time of each hop, in flow order.
HOPS = (
    ("gateway Infer", "gateway", "fmserve_gateway_request_duration_seconds", "Infer"),
    ("  gateway queue (per text)", "gateway", "fmserve_gateway_queue_delay_seconds", ""),
    ("  cache Lookup", "cache", "fmserve_cache_request_duration_seconds", "Lookup"),
    (
        "  preprocess Tokenize",
        "preprocess",
        "fmserve_preprocess_request_duration_seconds",
        "Tokenize",
    ),
    (
        "  inference ModelInfer",
        "inference",
        "fmserve_inference_request_duration_seconds",
        "ModelInfer",
    ),
    ("    batcher queue (per text)", "inference", "fmserve_inference_queue_delay_seconds", ""),
    ("    forward pass (per batch)", "inference", "fmserve_inference_compute_duration_seconds", ""),
    (
        "  postprocess Postprocess",
        "postprocess",
        "fmserve_postprocess_request_duration_seconds",
        "Postprocess",
    ),
)
BATCHES = (
    ("gateway texts per downstream call", "gateway", "fmserve_gateway_batch_size"),
    ("inference sequences per forward pass", "inference", "fmserve_inference_batch_size"),
)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads, so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def own_cpu_seconds() -> float:
    """This process's CPU (the benchmark's client side)."""
    times = os.times()
    return times.user + times.system


def scrape(port: int) -> dict[tuple[str, str], float]:
    """{(sample name, method label): value}, summed over the other labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, sample.labels.get("method", ""))
            samples[key] = samples.get(key, 0.0) + sample.value
    return samples


@dataclass
class Snapshot:
    metrics: dict[str, dict[tuple[str, str], float]]
    cpu: dict[str, float]
    """CPU seconds per service (all its replicas), and "client" for this process."""

    @classmethod
    def take(cls, cluster: Cluster) -> Snapshot:
        metrics: dict[str, dict[tuple[str, str], float]] = {}
        cpu = {"client": own_cpu_seconds()}
        for service in SERVICES:
            merged: dict[tuple[str, str], float] = {}
            cpu[service] = 0.0
            for replica in cluster.replicas_of[service]:
                for key, value in scrape(replica.metrics_port).items():
                    merged[key] = merged.get(key, 0.0) + value
                if replica.process is not None:
                    cpu[service] += cpu_seconds(replica.process.pid)
            metrics[service] = merged
        return cls(metrics, cpu)


@dataclass
class Budget:
    before: Snapshot
    after: Snapshot
    requests: int
    seconds: float

    def delta(self, service: str, name: str, method: str) -> float:
        key = (name, method)
        return self.after.metrics[service].get(key, 0.0) - self.before.metrics[service].get(
            key, 0.0
        )

    def mean_ms(self, service: str, histogram: str, method: str) -> tuple[float, float]:
        """(mean ms per observation, observations per request)."""
        count = self.delta(service, histogram + "_count", method)
        total = self.delta(service, histogram + "_sum", method)
        return (total / count * 1e3 if count else 0.0), count / max(1, self.requests)

    def lines(self, client_p50_ms: float, client_mean_ms: float) -> list[str]:
        out = [f"client: {client_mean_ms:.2f} ms mean, {client_p50_ms:.2f} ms p50 per request"]
        for label, service, histogram, method in HOPS:
            mean, per_request = self.mean_ms(service, histogram, method)
            out.append(f"{label:<34} {mean:8.2f} ms  x{per_request:5.2f} per request")
        for label, service, histogram in BATCHES:
            count = self.delta(service, histogram + "_count", "")
            total = self.delta(service, histogram + "_sum", "")
            out.append(f"{label:<34} {total / count if count else 0.0:8.2f}")
        cores = os.cpu_count() or 1
        spent = {name: self.after.cpu[name] - self.before.cpu[name] for name in self.after.cpu}
        for name, seconds in spent.items():
            per_request = seconds / max(1, self.requests) * 1e3
            out.append(f"CPU {name:<30} {per_request:8.2f} core-ms per request")
        busy = sum(spent.values()) / (self.seconds * cores)
        out.append(f"CPU all processes: {busy:.0%} of {cores} cores over the window")
        return out
