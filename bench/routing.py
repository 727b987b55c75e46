"""Benchmark: what a traffic policy costs on the synchronous path.

    make bench            (or: python -m bench.routing --seconds 10)

One cluster serves the bundled embedding model under two names, each with versions 1 and 2
(the same weights): `minilm-plain` has no policy (its requests go to the default version,
2), `minilm-embed` a policy that sends every request to a guarded canary (stable 1, canary 2
at 100%, an error-ratio guard): each request draws its version, is counted in the canary's
guard window, and the guardian judges the window twice a second; both models batch on one
version, so only routing differs. Interleaved round by round (the machine is shared), single
sentences with the cache bypassed at concurrency 1 (p50) and 32 (throughput). Then, in this
process, the CPU the gateway's per-request routing work (route, shadow lookup, outcome count)
spends with and without the policy: the part a policy changes, free of the machine's noise.
Target: within noise (<= 2%)."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.embedding import MODEL, REPOSITORY, Load, closed_loop, start_cluster
from fmserve import Client
from fmserve.client import Guard, TrafficPolicy
from fmserve.core.repository import ModelRepository
from fmserve.core.tasks import TaskName
from fmserve.v1 import policy_pb2
from services.gateway.outcomes import Outcomes
from services.gateway.policies import PolicyBook
from services.gateway.policy_store import PolicyStore
from services.gateway.routes import Router

PLAIN = "minilm-plain"
POLICY = TrafficPolicy(
    MODEL, stable="1", canary="2", canary_percent=100, guard=Guard(max_error_ratio=0.5)
)


def two_version_repository() -> Path:
    """The embedding model as MODEL and PLAIN, each with version 2 beside its source's 1."""
    root = Path(tempfile.mkdtemp(prefix="fmserve-bench-routing-"))
    files = ModelRepository(REPOSITORY).get(MODEL).files()
    toml = (REPOSITORY / MODEL / "model.toml").read_text()
    for name in (MODEL, PLAIN):
        (root / name).mkdir()
        (root / name / "model.toml").write_text(toml)
        os.symlink(files, root / name / "2")
    return root


def routing_cpu_us(repository: Path, calls: int = 100_000) -> dict[str, float]:
    """The gateway's per-request work that a policy changes, in CPU microseconds: choosing the
    route, looking for a shadow, and counting the outcome (into the guard's window, for the
    guarded canary), for a model with and without a policy."""
    book = PolicyBook(PolicyStore("127.0.0.1:1"), poll_s=1.0)  # never started: set below
    book.apply(
        policy_pb2.TrafficPolicy(
            model=MODEL, stable_version="1", canary_version="2", canary_percent=100, revision=1,
            guard=policy_pb2.Guard(max_error_ratio=0.5),
        )
    )  # fmt: skip
    router = Router(ModelRepository(repository), 64, 1000, book)
    outcomes = Outcomes(book)
    spent: dict[str, list[float]] = {}
    for name in (PLAIN, MODEL, PLAIN, MODEL):
        start = time.process_time()
        for _ in range(calls):
            route = router.route(name, "", TaskName.EMBEDDING, False, 0)
            router.shadow(route)
            outcomes.record(route.model, route.version, True, 0.01)
        spent.setdefault(name, []).append((time.process_time() - start) / calls * 1e6)
    return {name: min(times) for name, times in spent.items()}


def measure(address: str, seconds: float, rounds: int) -> dict[str, list[Load]]:
    loads: dict[str, list[Load]] = {}
    for round_ in range(rounds):
        for concurrency in (1, 32):
            # each goes first in every other round: a neighbour's load drifts within a round too
            for name in (PLAIN, MODEL) if round_ % 2 == 0 else (MODEL, PLAIN):
                load = asyncio.run(
                    closed_loop(address, concurrency, seconds, repeat=False, model=name)
                )
                loads.setdefault(f"{name} c={concurrency}", []).append(load)
    return loads


def report(loads: dict[str, list[Load]], cpu_us: dict[str, float]) -> None:
    def p50(key: str) -> float:
        return statistics.median(load.pct(0.5) for load in loads[key])

    def rate(key: str) -> float:
        return statistics.mean(load.rate for load in loads[key])

    for key in sorted(loads):
        rounds = " ".join(f"{load.rate:.0f}/{load.pct(0.5):.1f}" for load in loads[key])
        print(f"{key:<20} {rate(key):7.1f} req/s   p50 {p50(key):7.2f} ms   (rounds: {rounds})")
    c1 = p50(f"{MODEL} c=1") / p50(f"{PLAIN} c=1")
    c32 = rate(f"{MODEL} c=32") / rate(f"{PLAIN} c=32")
    print(f"\npolicy/none: c=1 p50 {c1:.3f}   c=32 throughput {c32:.3f}   [within 0.98-1.02]")
    print(
        f"routing CPU per request (route, shadow, outcome): {cpu_us[PLAIN]:.2f} us without a "
        f"policy, {cpu_us[MODEL]:.2f} us with one"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    args = parser.parse_args()
    repository = two_version_repository()
    cluster = start_cluster(
        {"FMSERVE_MODEL_REPOSITORY": str(repository), "FMSERVE_INFERENCE_PRELOAD": ""}
    )
    try:
        address = cluster.address("gateway")
        with Client(address, timeout=300) as client:
            client.set_traffic_policy(POLICY)
            for name in (MODEL, PLAIN):  # load both before timing
                client.embed("warm-up", model=name, cache="bypass")
        loads = measure(address, args.seconds, args.rounds)
    finally:
        cluster.stop()
    report(loads, routing_cpu_us(repository))


if __name__ == "__main__":
    main()
