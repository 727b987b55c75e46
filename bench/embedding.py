"""Benchmark: the bundled embedding model in-process against the full cluster.

    make bench            (or: python -m bench.embedding --seconds 10)

In one run it measures
1. the model called in-process (tokenize, forward, mean-pool, normalise) with 2 torch threads,
   in fp32 and in bf16: throughput at several batch sizes (the best is the ceiling on this
   machine) and the p50 of one sentence alone, called back to back and with the machine idle
   between calls as a lone request's forward pass in the cluster meets it;
2. the cluster (five processes, `fmserve up`'s code path) under closed-loop load of
   single-sentence requests at concurrency 1 and 32, cache bypassed: throughput, p50, p99;
3. cache hits: the same sentence again and again, at concurrency 1 (p50) and 32 (throughput);
4. cache misses at concurrency 1: new sentences with the cache in use, the default: what the
   lookup before the model adds to a lone request;
and prints each figure with its ratio to the in-process baseline of the same run, since the
machine is shared and absolute numbers drift (the baseline is measured before and after the
cluster, and the faster of the two taken, so a slow spell during one of them cannot flatter
the cluster); then, for the model at concurrency 1 and 32,
where each request's time and CPU went (bench/budget.py)."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.budget import Budget, Snapshot
from fmserve.cli.cluster import SERVICES, Cluster, free_port
from fmserve.core.repository import ModelRepository
from fmserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

MODEL = "minilm-embed"
REPOSITORY = Path(__file__).resolve().parent.parent / "models"
IDLE_GAP_S = 0.006
"""What a lone request spends in the cluster outside the forward pass, about: the in-process
single sentence is timed again with this much idle time before each call."""


@dataclass
class Load:
    requests: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Baseline:
    """The model called in-process: sentences/s per batch size, and one sentence's p50."""

    precision: str
    rates: dict[int, float]
    single_ms: float
    single_after_idle_ms: float
    """One sentence's p50 when the machine was idle for IDLE_GAP_S before each call: OpenMP's
    threads asleep, caches and clocks cold, as at concurrency 1 in the cluster."""

    @property
    def best(self) -> float:
        return max(self.rates.values())

    def faster(self, other: Baseline) -> Baseline:
        """Per figure, the faster of two measurements of the same baseline."""
        return Baseline(
            self.precision,
            {size: max(rate, other.rates[size]) for size, rate in self.rates.items()},
            min(self.single_ms, other.single_ms),
            min(self.single_after_idle_ms, other.single_after_idle_ms),
        )


def in_process(seconds: float, threads: int, precision: str) -> Baseline:
    """Tokenize, forward, mean-pool and normalise, as the inference service does, in-process."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    folder = ModelRepository(REPOSITORY).get(MODEL).files()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=dtype).eval()

    def embed(texts: list[str]) -> None:
        batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    rates = {}
    for size in (1, 8, 32, 64):
        texts = [sentence(i, f"base00-{i % 32}") for i in range(size)]
        embed(texts)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 4:
            embed(texts)
            done += size
        rates[size] = done / (time.perf_counter() - start)

    def single_p50(gap_s: float) -> float:
        times = []
        for i in range(200):
            time.sleep(gap_s)
            start = time.perf_counter()
            embed([sentence(i, f"base00-{i % 32}")])
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return Baseline(precision, rates, single_p50(0.0), single_p50(IDLE_GAP_S))


def sentence(i: int, tag: str) -> str:
    """Single sentences of ~23 tokens; the tag keeps cluster requests unique (no cache hits)."""
    return f"Benchmark sentence number {i} about serving models on your own machines. {tag}"


async def closed_loop(
    address: str,
    concurrency: int,
    seconds: float,
    *,
    repeat: bool,
    metadata: tuple[tuple[str, str], ...] = (),
    version: str = "",
    model: str = MODEL,
    cache: bool | None = None,
) -> Load:
    """`concurrency` clients each sending one single-sentence request after another (with
    `metadata` on each, e.g. an API key) to the model's `version` (default: its default): the
    same sentence (`repeat`) or a new one each time; the cache in use (`cache`; by default for
    repeated sentences only) or bypassed."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        use = repeat if cache is None else cache
        policy = common_pb2.CACHE_POLICY_USE if use else common_pb2.CACHE_POLICY_BYPASS
        options = gateway_pb2.InferOptions(cache_policy=policy)
        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds
        run = uuid.uuid4().hex[:6]

        async def worker(w: int) -> None:
            i = 0
            while time.perf_counter() < stop_at:
                text = "cached benchmark sentence" if repeat else sentence(i, f"{run}-{w}")
                request = gateway_pb2.InferRequest(
                    model=model, version=version, texts=[text], options=options
                )
                start = time.perf_counter()
                await stub.Infer(request, timeout=30, metadata=metadata)
                latencies.append((time.perf_counter() - start) * 1e3)
                i += 1

        if repeat:  # put the entry in the cache before timing hits
            warm = gateway_pb2.InferRequest(
                model=model, version=version, texts=["cached benchmark sentence"]
            )
            await stub.Infer(warm, timeout=30, metadata=metadata)
        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return Load(len(latencies), time.perf_counter() - start, latencies)


# The synchronous path only: no job queues, so a run leaves nothing in a shared RabbitMQ.
SYNC_ONLY = {
    "FMSERVE_GATEWAY_JOBS_ENABLED": "false",
    "FMSERVE_PREPROCESS_WORKER_ENABLED": "false",
    "FMSERVE_INFERENCE_WORKER_ENABLED": "false",
    "FMSERVE_POSTPROCESS_WORKER_ENABLED": "false",
}


def start_cluster(env: dict[str, str]) -> Cluster:
    ports = {name: free_port() for name in SERVICES}
    log_dir = Path(tempfile.mkdtemp(prefix="fmserve-bench-"))
    env = {
        **SYNC_ONLY,
        "FMSERVE_INFERENCE_PRELOAD": MODEL,
        "FMSERVE_LOG_LEVEL": "WARNING",
        "FMSERVE_CACHE_KEY_PREFIX": f"fmserve-bench-{uuid.uuid4().hex[:8]}:",
        "FMSERVE_CACHE_DEFAULT_TTL_S": "300",
        **env,
    }
    cluster = Cluster(env=env, ports=ports, log_dir=log_dir, say=lambda _: None)
    cluster.start()
    return cluster


def report(baselines: list[Baseline], loads: dict[str, Load]) -> None:
    for b in baselines:
        rates = ", ".join(f"batch {size}: {rate:.0f}/s" for size, rate in b.rates.items())
        print(
            f"\nin-process {b.precision} (2 threads): {rates}; single p50 {b.single_ms:.2f} ms, "
            f"{b.single_after_idle_ms:.2f} ms after {IDLE_GAP_S * 1e3:.0f} ms idle"
        )
    print()
    for name, load in loads.items():
        p50, p99 = load.pct(0.5), load.pct(0.99)
        print(f"{name:<22} {load.rate:8.1f} req/s   p50 {p50:7.2f} ms   p99 {p99:7.2f} ms")
    c32, c1, hit1, hit32 = (
        loads[k] for k in ("model c=32", "model c=1", "cache hit c=1", "cache hit c=32")
    )
    for b in baselines:
        print(f"\nratios against the in-process model in {b.precision} (target in brackets)")
        print(f"  cluster/in-process throughput at c=32: {c32.rate / b.best:.2f}   [>= 0.85]")
        print(
            f"  c=1 p50 minus in-process single p50:   {c1.pct(0.5) - b.single_ms:+.2f} ms [<= 3]"
            f" ({b.single_after_idle_ms - b.single_ms:+.2f} ms of it the idle gap's, in-process)"
        )
    print(f"\ncache-hit p50: {hit1.pct(0.5):.2f} ms [<= 1.5 ms]")
    miss1 = loads["cache miss c=1"]
    print(f"cache-miss p50 minus bypass p50 at c=1: {miss1.pct(0.5) - c1.pct(0.5):+.2f} ms")
    print(f"cache-hit/model throughput at c=32: {hit32.rate / c32.rate:.2f} [>= 3]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, in-process")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "both"],
        default="both",
        help="in-process baselines (the cluster runs the model's configured precision)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="cluster setting, repeatable",
    )
    args = parser.parse_args()
    precisions = ("fp32", "bf16") if args.precision == "both" else (args.precision,)
    first = [in_process(args.seconds, args.threads, p) for p in precisions]
    env = dict(item.split("=", 1) for item in args.env)
    cluster = start_cluster(env)
    try:
        address = cluster.address("gateway")
        loads, budgets = {}, {}
        for name, concurrency, repeat, cache in (
            ("model c=1", 1, False, False),
            ("model c=32", 32, False, False),
            ("cache hit c=1", 1, True, True),
            ("cache hit c=32", 32, True, True),
            ("cache miss c=1", 1, False, True),
        ):
            before = Snapshot.take(cluster)
            load = asyncio.run(
                closed_loop(address, concurrency, args.seconds, repeat=repeat, cache=cache)
            )
            loads[name] = load
            budgets[name] = Budget(before, Snapshot.take(cluster), load.requests, load.seconds)
    finally:
        cluster.stop()
    last = [in_process(args.seconds, args.threads, p) for p in precisions]
    for when, measured in (("before", first), ("after", last)):
        for b in measured:
            print(
                f"in-process {b.precision} {when} the cluster: best {b.best:.0f}/s, single "
                f"p50 {b.single_ms:.2f} ms ({b.single_after_idle_ms:.2f} ms after idle)"
            )
    report([b.faster(a) for b, a in zip(first, last, strict=True)], loads)
    for name in ("model c=1", "model c=32", "cache miss c=1"):
        load = loads[name]
        print(f"\nwhere the time and CPU of {name} went (per request; bench/budget.py):")
        for line in budgets[name].lines(load.pct(0.5), statistics.mean(load.latencies_ms)):
            print("  " + line)


if __name__ == "__main__":
    main()
