"""Benchmark: the asynchronous path against the synchronous one, on one cluster.

    python -m bench.jobs [--items 10000] [--trials 3]

In one run it measures
1. the sync path saturated: single-sentence Infer calls at concurrency 32, cache bypassed
   (items/s), and its latency at concurrency 4 with nothing else running (p50, p99);
2. a 10,000-item job of the embedding model: items/s from submit to the last item answered,
   and its ratio to (1) (target >= 0.8);
3. sync latency at concurrency 4 while another such job runs (target p99 <= 2x of (1));
4. the plumbing ceiling: a job through every stage with a trivially cheap model (a 1-layer,
   16-wide BERT built here, the "identity" model: the model's cost is noise) (target >= 5,000
   items/s).
The latencies of (1) and (3) come from `--trials` rounds of "alone, then during a job", so load
that comes and goes on a shared machine falls on both alike; the p50 and p99 printed pool every
round, and each round's own p99 ratio is printed beside them.
Figures drift on a shared machine: compare the ratios printed, not runs on different days."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis

from fmserve import AsyncClient
from fmserve.cli.cluster import SERVICES, Cluster, free_port
from fmserve.queue.topology import Topology, delete_queues

REPOSITORY = Path(__file__).resolve().parent.parent / "models"
MODEL = "minilm-embed"
CHEAP = "identity"
# The cluster's defaults (FMSERVE_REDIS_URL and FMSERVE_AMQP_URL unset): where to clean up.
REDIS_URL = "redis://127.0.0.1:6379/0"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def texts(count: int) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"sentence {i} about serving models on your own machines ({tag})" for i in range(count)]


def build_cheap_model(root: Path) -> None:
    """A classifier whose forward pass costs next to nothing: measures the plumbing alone."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    from fmserve.core.repository import ModelRepository

    config = BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=16,
        max_position_embeddings=128,
        id2label={0: "a", 1: "b"},
        label2id={"a": 0, "b": 1},
    )
    folder = root / CHEAP / "1"
    AutoModelForSequenceClassification.from_config(config).eval().save_pretrained(folder)
    source = ModelRepository(REPOSITORY).get(MODEL).files()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(source / name, folder / name)
    (root / CHEAP / "model.toml").write_text(
        'task = "text-classification"\nmax_length = 128\n'
        "[batching]\nmax_batch_size = 64\nmax_batch_tokens = 65536\n"
    )


async def sync_load(client: AsyncClient, seconds: float, concurrency: int) -> tuple[float, list]:
    latencies: list[float] = []
    stop = time.monotonic() + seconds
    corpus = iter(texts(1_000_000))

    async def one() -> None:
        while time.monotonic() < stop:
            started = time.perf_counter()
            await client.infer([next(corpus)], MODEL, cache="bypass")
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    return len(latencies) / (time.monotonic() - started), latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def job_rate(client: AsyncClient, model: str, count: int) -> float:
    started = time.monotonic()
    job = await client.submit(texts(count), model=model)
    status = await job.wait(timeout=1800)
    assert status.state == "succeeded" and status.done == count, status
    return count / (time.monotonic() - started)


@dataclass
class Trials:
    quiet: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    overran: int = 0
    """Rounds whose job ended before their busy window did (that window was partly quiet)."""


async def latency_trials(client: AsyncClient, items: int, seconds: float, rounds: int) -> Trials:
    """Sync latency at concurrency 4 alone, then while a job runs, `rounds` times over."""
    trials = Trials()
    for _ in range(rounds):
        _, quiet = await sync_load(client, seconds, 4)
        background = asyncio.ensure_future(job_rate(client, MODEL, items))
        await asyncio.sleep(1.0)
        _, busy = await sync_load(client, seconds, 4)
        trials.overran += background.done()
        await background
        trials.quiet += quiet
        trials.busy += busy
        trials.ratios.append(pct(busy, 0.99) / pct(quiet, 0.99))
    return trials


async def run(address: str, items: int, seconds: float, rounds: int) -> None:
    async with AsyncClient(address, timeout=60) as client:
        await client.infer(["warm up"], MODEL, cache="bypass")
        await job_rate(client, MODEL, 200)  # warm the job path too
        sync_rate, _ = await sync_load(client, seconds, 32)
        job = await job_rate(client, MODEL, items)
        trials = await latency_trials(client, items, seconds, rounds)
        await job_rate(client, CHEAP, 500)  # load the cheap model
        plumbing = await job_rate(client, CHEAP, items)
    print(f"sync path saturated (c=32):      {sync_rate:8.0f} items/s")
    print(f"job of {items} items:          {job:8.0f} items/s   ratio {job / sync_rate:.2f}")
    report_latencies(trials)
    print(f"plumbing ceiling (cheap model):  {plumbing:8.0f} items/s")


def report_latencies(trials: Trials) -> None:
    quiet, busy = trials.quiet, trials.busy
    p50, p99 = statistics.median(quiet), pct(quiet, 0.99)
    b50, b99 = statistics.median(busy), pct(busy, 0.99)
    rounds = " ".join(f"{r:.2f}" for r in trials.ratios)
    print(f"sync c=4 alone:                  p50 {p50:6.1f} ms  p99 {p99:6.1f} ms")
    print(
        f"sync c=4 while a job runs:       p50 {b50:6.1f} ms  p99 {b99:6.1f} ms   "
        f"p99 ratio {b99 / p99:.2f} (rounds: {rounds})"
    )
    if trials.overran:
        print(f"  {trials.overran} job(s) ended before their busy window did: use more --items")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--trials", type=int, default=3, help="rounds of latency alone/busy")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        shutil.copytree(REPOSITORY, root)
        build_cheap_model(root)
        prefix = f"bench-{uuid.uuid4().hex[:6]}"
        env = {
            "FMSERVE_MODEL_REPOSITORY": str(root),
            "FMSERVE_INFERENCE_PRELOAD": MODEL,
            "FMSERVE_AMQP_QUEUE_PREFIX": f"{prefix}.",
            "FMSERVE_CACHE_KEY_PREFIX": f"{prefix}:",
            "FMSERVE_LOG_LEVEL": "WARNING",
        }
        ports = {name: free_port() for name in SERVICES}
        cluster = Cluster(env=env, ports=ports, log_dir=Path(tmp) / "logs", say=lambda _: None)
        try:
            cluster.start()
            asyncio.run(run(cluster.address("gateway"), args.items, args.seconds, args.trials))
        finally:
            cluster.stop()
            asyncio.run(delete_queues(AMQP_URL, Topology(f"{prefix}.")))
            forget_keys(f"{prefix}:")


def forget_keys(prefix: str) -> None:
    """Delete the job records and results the run left in Redis (they are kept a day)."""
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


if __name__ == "__main__":
    main()
