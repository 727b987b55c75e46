"""Benchmark: what API keys and per-key rate limits cost on the synchronous path.

    make bench            (or: python -m bench.auth --seconds 10)

One cluster, two gateways in front of the same stages: one with auth off, one with auth on
(`FMSERVE_AUTH=on`). Through them, in the same run and interleaved round by round (the machine
is shared, so figures drift between minutes), four callers:
1. auth off (no key);
2. auth on, a key without limits (key check: cached by the gateway for
   FMSERVE_GATEWAY_KEY_CACHE_S, then asked of the cache service again);
3. auth on, a key with an rpm limit far above the load (the check above plus a token taken
   from its bucket in Redis through the cache service on every call);
4. auth on, a key with every limit, none reached (rpm, concurrency: a slot taken and given
   back per call; daily items).
Each sends single-sentence requests (the model's path, cache bypassed; then cache hits, where
the cost is largest relative to the answer) at concurrency 1 (p50) and 32 (throughput). It
prints each as the p50 added and the throughput kept relative to auth off, and the CPU time
the cluster's processes spent per request at concurrency 32, and of that the front's (the
gateways and the cache service, where auth and limits run): on a machine shared with other
work, wall-clock figures drift with the neighbours' load, CPU per request much less so (and
on a CPU-bound machine throughput goes as its inverse). Last, in this process, the CPU the
auth interceptor itself spends per call (a cached key, no limits): the gateway's per-call
Python work, which neither load nor the network distorts.
Targets: <= 0.5 ms added at p50, >= 95% of the throughput."""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import grpc
import redis

from bench.embedding import MODEL, SYNC_ONLY, Load, closed_loop
from fmserve.cli.cluster import SERVICES, Cluster, Replica, free_port
from fmserve.core import apikeys
from fmserve.core.settings import ClientSettings
from fmserve.v1 import gateway_pb2, gateway_pb2_grpc, keys_pb2
from services.gateway.access import AccessTable
from services.gateway.auth import AuthInterceptor
from services.gateway.keyring import KeyRing
from services.gateway.principal import AdmitAll

ADMIN_KEY = apikeys.generate().api_key
MODES = ("auth off", "key, no limits", "key + rpm limit", "key + all limits")
UNREACHED = {"rpm": 10_000_000, "max_concurrency": 100_000, "daily_items": 10**12}
"""Limits the load never reaches: every call takes its token, slot and items; none is refused."""


class TwoGateways(Cluster):
    """The cluster with a second gateway replica whose auth is off."""

    def child_env(self, replica: Replica) -> dict[str, str]:
        env = super().child_env(replica)
        if replica is self.replicas_of["gateway"][1]:
            env["FMSERVE_AUTH"] = "off"
        return env


def start_cluster(prefix: str) -> TwoGateways:
    env = {
        **SYNC_ONLY,
        "FMSERVE_AUTH": "on",
        "FMSERVE_ADMIN_KEY": ADMIN_KEY,
        "FMSERVE_INFERENCE_PRELOAD": MODEL,
        "FMSERVE_LOG_LEVEL": "WARNING",
        "FMSERVE_CACHE_KEY_PREFIX": prefix,
        "FMSERVE_CACHE_DEFAULT_TTL_S": "300",
    }
    ports = {name: free_port() for name in SERVICES}
    log_dir = Path(tempfile.mkdtemp(prefix="fmserve-bench-auth-"))
    cluster = TwoGateways(
        env=env, ports=ports, replicas={"gateway": 2}, log_dir=log_dir, say=lambda _: None
    )
    cluster.start()
    return cluster


async def create_key(address: str, name: str, **limits: int) -> str:
    request = keys_pb2.CreateApiKeyRequest(name=name, scopes=["infer:*"], **limits)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        metadata = (("authorization", f"Bearer {ADMIN_KEY}"),)
        reply = await stub.CreateApiKey(request, metadata=metadata, timeout=30)
    return str(reply.api_key)


def cpu_s(pids: list[int]) -> float:
    """CPU time (user + system) the processes have used so far, from /proc (Linux)."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime: the stat file's 14th, 15th
    return ticks / os.sysconf("SC_CLK_TCK")


def merged(loads: list[Load]) -> Load:
    return Load(
        sum(x.requests for x in loads),
        sum(x.seconds for x in loads),
        [ms for x in loads for ms in x.latencies_ms],
    )


Key = tuple[str, str, int]
"""(path, mode, concurrency)."""


async def measure(
    callers: dict[str, tuple[str, str]],
    seconds: float,
    rounds: int,
    paths: list[str],
    pids: dict[str, list[int]],
) -> tuple[dict[Key, Load], dict[tuple[Key, str], float]]:
    """Every (path, mode, concurrency), interleaved: each round runs each mode once. Returns
    the loads and, per group of processes in `pids`, their CPU milliseconds per request."""
    runs: dict[Key, list[Load]] = defaultdict(list)
    cpu: dict[tuple[Key, str], float] = defaultdict(float)
    for _ in range(rounds):
        for path in paths:
            for concurrency in (1, 32):
                for mode, (address, key) in callers.items():
                    metadata = (("authorization", f"Bearer {key}"),) if key else ()
                    before = {group: cpu_s(p) for group, p in pids.items()}
                    load = await closed_loop(
                        address, concurrency, seconds, repeat=path == "cache hit", metadata=metadata
                    )
                    for group, p in pids.items():
                        cpu[(path, mode, concurrency), group] += cpu_s(p) - before[group]
                    runs[path, mode, concurrency].append(load)
    loads = {k: merged(v) for k, v in runs.items()}
    return loads, {(k, g): 1e3 * cpu[k, g] / loads[k].requests for k in loads for g in pids}


def report(loads: dict[Key, Load], cpu_ms: dict[tuple[Key, str], float], paths: list[str]) -> None:
    """Per mode: c=1 p50, c=32 throughput, CPU per request at c=32 of the whole cluster and of
    its front (the gateways and the cache service, where auth and limits run: the inference
    service's CPU, which they do not change, dominates the cluster's and its noise)."""
    for path in paths:
        print(f"\n{path}:")
        base1, base32 = loads[path, MODES[0], 1], loads[path, MODES[0], 32]
        base_cpu, base_front = (
            cpu_ms[(path, MODES[0], 32), "cluster"],
            cpu_ms[(path, MODES[0], 32), "front"],
        )
        for mode in MODES:
            c1, c32 = loads[path, mode, 1], loads[path, mode, 32]
            cpu, front = cpu_ms[(path, mode, 32), "cluster"], cpu_ms[(path, mode, 32), "front"]
            line = (
                f"  {mode:<16} c=1 p50 {c1.pct(0.5):6.2f} ms   c=32 {c32.rate:7.1f} req/s"
                f"   CPU ms/req {cpu:5.2f} (front {front:4.2f})"
            )
            if mode != MODES[0]:
                added = c1.pct(0.5) - base1.pct(0.5)
                kept = c32.rate / base32.rate
                line += (
                    f"   p50 {added:+.2f} ms [<= 0.5]   throughput kept {kept:.3f}, "
                    f"by CPU {base_cpu / cpu:.3f} [>= 0.95]   front {front - base_front:+.2f} ms"
                )
            print(line)


class _OneKey:
    """A key store holding one key: the interceptor's per-call work without the cache service
    (a verified key is cached by the gateway, so a busy key never reaches the store)."""

    def __init__(self, key: apikeys.NewKey) -> None:
        info = keys_pb2.ApiKeyInfo(key_id=key.key_id, name="bench", scopes=["infer:*"])
        self.stored = keys_pb2.StoredKey(info=info, salt=key.salt, hash=key.digest)

    async def get(self, key_id: str) -> keys_pb2.StoredKey:
        return self.stored


@dataclass
class _Details:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


class _Context:
    def __init__(self, api_key: str) -> None:
        self.metadata = (("user-agent", "bench"), ("authorization", f"Bearer {api_key}"))

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata


async def interceptor_cpu_us(calls: int = 20_000) -> float:
    """CPU microseconds the auth interceptor adds to a unary call, in this process."""
    key = apikeys.generate()
    table = AccessTable(lambda _: "embedding", lambda _: (0, 0))
    auth = AuthInterceptor(KeyRing(_OneKey(key), 60.0), table, AdmitAll())  # type: ignore[arg-type]

    async def answer(request: object, context: object) -> object:
        return request

    handler = grpc.unary_unary_rpc_method_handler(answer)

    async def continuation(_: object) -> grpc.RpcMethodHandler:
        return handler

    details = _Details("/fmserve.v1.Gateway/Infer")
    request = gateway_pb2.InferRequest(model=MODEL, texts=["a sentence"])
    context = _Context(key.api_key)

    async def run(intercepted: bool) -> float:
        started = time.process_time()
        for _ in range(calls):
            if intercepted:
                wrapped = await auth.intercept_service(continuation, details)  # type: ignore[arg-type]
            else:
                wrapped = await continuation(details)
            await wrapped.unary_unary(request, context)
        return (time.process_time() - started) / calls * 1e6

    await run(True)  # the key verified and cached, as for a busy key
    return await run(True) - await run(False)


def forget(prefix: str) -> None:
    """Delete what the run left in Redis (its keys' records, cached results, buckets)."""
    client = redis.Redis.from_url(ClientSettings().redis_url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--no-hits", action="store_true", help="skip the cache-hit path")
    args = parser.parse_args()
    paths = ["model (cache bypassed)", *([] if args.no_hits else ["cache hit"])]
    prefix = f"fmserve-bench-auth-{uuid.uuid4().hex[:8]}:"
    cluster = start_cluster(prefix)
    try:
        on, off = (r.address for r in cluster.replicas_of["gateway"])
        run = prefix[-9:-1]
        free = asyncio.run(create_key(on, f"bench-free-{run}"))
        rpm = asyncio.run(create_key(on, f"bench-rpm-{run}", rpm=UNREACHED["rpm"]))
        every = asyncio.run(create_key(on, f"bench-all-{run}", **UNREACHED))
        callers = {
            MODES[0]: (off, ""),
            MODES[1]: (on, free),
            MODES[2]: (on, rpm),
            MODES[3]: (on, every),
        }
        pids = {
            "cluster": [r.process.pid for r in cluster.all() if r.process],
            "front": [
                r.process.pid
                for r in cluster.replicas_of["gateway"] + cluster.replicas_of["cache"]
                if r.process
            ],
        }
        loads, cpu_ms = asyncio.run(measure(callers, args.seconds, args.rounds, paths, pids))
    finally:
        cluster.stop()
        forget(prefix)
    report(loads, cpu_ms, paths)
    added = asyncio.run(interceptor_cpu_us())
    print(f"\nauth interceptor, in one process (a cached key, no limits): {added:.1f} CPU us/call")


if __name__ == "__main__":
    main()
