"""Benchmark: what auth costs on the synchronous path.

    python -m bench.auth --seconds 3 --rounds 3

One cluster (five services, `fmserve up`'s code path) with two gateways on the same stages: one
with FMSERVE_AUTH on, one with it off. Rounds alternate between them (each first in every other
round), so both see the same machine: cache hits at concurrency 1 (p50: the gateway's own path,
where auth's cost shows most) and model calls at concurrency 32 (throughput), cache bypassed.
It prints the medians over rounds and the differences, against the issue's targets: <= 0.5 ms
added at p50, <= 5% throughput lost."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import uuid
from pathlib import Path

import redis

from bench.embedding import MODEL, Load, closed_loop
from fmserve import Client
from fmserve.cli.cluster import SERVICES, Cluster, Replica, free_port
from fmserve.core import apikeys
from fmserve.core.settings import ClientSettings


class _OneOpenGateway(Cluster):
    """The second gateway runs with auth off; everything else as configured."""

    def child_env(self, replica: Replica) -> dict[str, str]:
        env = super().child_env(replica)
        if replica is self.replicas_of["gateway"][-1]:
            env["FMSERVE_AUTH"] = "off"
        return env


def start(admin_key: str) -> Cluster:
    env = {
        "FMSERVE_AUTH": "on",
        "FMSERVE_ADMIN_KEY": admin_key,
        "FMSERVE_INFERENCE_PRELOAD": MODEL,
        "FMSERVE_LOG_LEVEL": "WARNING",
        "FMSERVE_CACHE_KEY_PREFIX": f"fmserve-bench-{uuid.uuid4().hex[:8]}:",
        "FMSERVE_CACHE_DEFAULT_TTL_S": "300",
    }
    cluster = _OneOpenGateway(
        env=env,
        ports={name: free_port() for name in SERVICES},
        replicas={"gateway": 2},
        log_dir=Path(tempfile.mkdtemp(prefix="fmserve-bench-auth-")),
        say=lambda _: None,
    )
    cluster.start()
    return cluster


def measure(cluster: Cluster, key: str, seconds: float, rounds: int) -> dict[str, list[Load]]:
    on, off = (r.address for r in cluster.replicas_of["gateway"])
    bearer = (("authorization", f"Bearer {key}"),)
    loads: dict[str, list[Load]] = {name: [] for name in ("hit on", "hit off", "c32 on", "c32 off")}
    sides = [("on", on, bearer), ("off", off, ())]
    for _ in range(rounds):
        sides.reverse()  # each side goes first in every other round
        for name, address, metadata in sides:
            hit = closed_loop(address, 1, seconds, repeat=True, metadata=metadata)
            loads[f"hit {name}"].append(asyncio.run(hit))
            c32 = closed_loop(address, 32, seconds, repeat=False, metadata=metadata)
            loads[f"c32 {name}"].append(asyncio.run(c32))
    return loads


def report(loads: dict[str, list[Load]]) -> None:
    p50 = {k: statistics.median(load.pct(0.5) for load in v) for k, v in loads.items()}
    rate = {k: statistics.median(load.rate for load in v) for k, v in loads.items()}
    print(f"cache hit c=1 p50: auth on {p50['hit on']:.3f} ms, off {p50['hit off']:.3f} ms")
    print(f"  added by auth: {p50['hit on'] - p50['hit off']:+.3f} ms   [<= 0.5 ms]")
    print(f"model c=32: auth on {rate['c32 on']:.1f} req/s, off {rate['c32 off']:.1f} req/s")
    print(f"  lost to auth: {1 - rate['c32 on'] / rate['c32 off']:+.1%}   [<= 5%]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of on and off")
    args = parser.parse_args()
    admin_key = apikeys.generate().api_key
    cluster = start(admin_key)
    try:
        # A stored key, as clients use (checked through the gateway's key cache), not the
        # admin key from the environment.
        address = cluster.replicas_of["gateway"][0].address
        with Client(address, api_key=admin_key) as admin:
            key = admin.create_api_key(f"bench-{uuid.uuid4().hex[:6]}", ["infer:*"]).api_key
        loads = measure(cluster, key, args.seconds, args.rounds)
    finally:
        cluster.stop()
        forget(cluster.env["FMSERVE_CACHE_KEY_PREFIX"])
    report(loads)


def forget(prefix: str) -> None:
    """Delete what the run left in Redis: key records have no TTL (cache entries do)."""
    client = redis.Redis.from_url(ClientSettings().redis_url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


if __name__ == "__main__":
    main()
