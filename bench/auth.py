"""Benchmark: what API keys and per-key rate limits cost on the synchronous path.

    make bench            (or: python -m bench.auth --seconds 10)

One cluster, two gateways in front of the same stages: one with auth off, one with auth on
(`FMSERVE_AUTH=on`). Through them, in the same run and interleaved round by round (the machine
is shared, so figures drift between minutes), five callers:
1. auth off (no key), and the same again as a control: how far two measurements of one thing
   differ in this run, the noise the others' differences are to be read against;
2. auth on, a key without limits (key check: cached by the gateway for
   FMSERVE_GATEWAY_KEY_CACHE_S, then asked of the cache service again);
3. auth on, a key with an rpm limit far above the load (the check above plus a token from
   its bucket in Redis: the gateway leases tokens ahead, so one check serves many calls);
4. auth on, a key with every limit, none reached (rpm, concurrency: a slot taken and given
   back per call; daily items).
Each sends single-sentence requests (the model's path, cache bypassed; then cache hits, where
the cost is largest relative to the answer) at concurrency 1 (p50) and 32 (throughput). At
concurrency 1 the callers take short turns in one loop, so that every mode meets the same
machine (this machine's lone-request latency drifts by several milliseconds
between windows of a few seconds, more than the costs measured); at concurrency 32 each mode
has a window of its own, the modes interleaved round by round. It prints each as the p50 added
and the throughput kept relative to auth off, the CPU time the cluster's processes spent per
request at concurrency 32, and of that the front's (the gateways and the cache service, where
auth and limits run): on a machine shared with other work, wall-clock figures drift with the
neighbours' load, CPU per request much less so (and on a CPU-bound machine throughput goes as
its inverse); and the limit checks the cache service answered per request (Admit calls: a
leased rpm limit should need next to none). Last, what neither load nor the network
distorts: the server CPU of a call with and without the auth layer, on two real gRPC servers
whose Infer does nothing (gRPC's part included: the metadata, one more interceptor); and, in
this process, the auth interceptor's own Python per call (a cached key without limits, and
with a leased rpm limit).
Targets: <= 0.5 ms added at p50, >= 95% of the throughput."""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import grpc
import redis

from bench.budget import cpu_seconds, scrape
from bench.embedding import MODEL, SYNC_ONLY, Load, closed_loop, sentence
from fmserve.cli.cluster import SERVICES, Cluster, Replica, free_port
from fmserve.core import apikeys
from fmserve.core import context as call_context
from fmserve.core.metrics import RpcMetrics
from fmserve.core.settings import ClientSettings
from fmserve.rpc.interceptors import ServiceInterceptor
from fmserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, keys_pb2, limits_pb2
from services.gateway.access import AccessTable
from services.gateway.auth import AuthInterceptor
from services.gateway.keyring import KeyRing
from services.gateway.limits import KeyLimits
from services.gateway.limits_client import LimitsClient
from services.gateway.principal import Admission, AdmitAll

ADMIN_KEY = apikeys.generate().api_key
MODES = ("auth off", "auth off, again", "key, no limits", "key + rpm limit", "key + all limits")
"""The second is a control: the first again, so that its ratios show the run's own noise."""
TURN = 4
"""Requests a caller sends in a row at concurrency 1; the first of each is not timed: a gateway
idle while the other served is slower to answer (1.6 ms in a run that timed every request)."""
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
    """CPU time (user + system) the processes have used so far."""
    return sum(cpu_seconds(pid) for pid in pids)


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
    cache_metrics_port: int,
) -> tuple[dict[Key, Load], dict[tuple[Key, str], float]]:
    """Every (path, mode, concurrency), interleaved: each round runs concurrency 1 with the
    modes taking turns, then each mode once at concurrency 32, starting with the mode after
    the one the previous round started with. Returns the loads and, per request at
    concurrency 32, each group of processes' CPU milliseconds (the groups of `pids`) and the
    limit checks the cache service answered ("checks")."""
    runs: dict[Key, list[Load]] = defaultdict(list)
    spent: dict[tuple[Key, str], float] = defaultdict(float)
    for round_ in range(rounds):
        # Each round starts with the next mode, so a drift within a round favours none of them;
        # every other round runs backwards, so each mode follows more than one other (a mode
        # may leave work behind, such as every limit's checks, for whichever comes next).
        turn = round_ % len(callers)
        order = [*callers.items()][turn:] + [*callers.items()][:turn]
        if round_ % 2:
            order.reverse()
        for path in paths:
            repeat = path == "cache hit"
            for mode, load in (await taking_turns(callers, seconds, repeat)).items():
                runs[path, mode, 1].append(load)
            for mode, (address, key) in order:
                key32 = (path, mode, 32)
                before = {group: cpu_s(p) for group, p in pids.items()}
                checks = admit_calls(cache_metrics_port)
                load = await closed_loop(address, 32, seconds, repeat=repeat, metadata=_bearer(key))
                for group, p in pids.items():
                    spent[key32, group] += (cpu_s(p) - before[group]) * 1e3
                spent[key32, "checks"] += admit_calls(cache_metrics_port) - checks
                runs[key32].append(load)
    loads = {k: merged(v) for k, v in runs.items()}
    return loads, {(k, group): total / loads[k].requests for (k, group), total in spent.items()}


async def taking_turns(
    callers: dict[str, tuple[str, str]], seconds: float, repeat: bool
) -> dict[str, Load]:
    """Concurrency 1, the callers taking turns of TURN requests for `seconds` each in all:
    each mode's latencies, measured under the same conditions as the others'. Only the
    latencies mean anything: every mode's load spans the whole shared window."""
    channels = {address: grpc.aio.insecure_channel(address) for address, _ in callers.values()}
    stubs = {address: gateway_pb2_grpc.GatewayStub(c) for address, c in channels.items()}
    policy = common_pb2.CACHE_POLICY_USE if repeat else common_pb2.CACHE_POLICY_BYPASS
    options = gateway_pb2.InferOptions(cache_policy=policy)
    cached = "cached benchmark sentence"
    latencies: dict[str, list[float]] = {mode: [] for mode in callers}
    run = uuid.uuid4().hex[:6]
    try:
        if repeat:  # the entry in the cache before hits are timed
            for address, key in callers.values():
                warm = gateway_pb2.InferRequest(model=MODEL, texts=[cached])
                await stubs[address].Infer(warm, timeout=30, metadata=_bearer(key))
        started = time.perf_counter()
        stop_at = started + seconds * len(callers)
        i = 0
        while time.perf_counter() < stop_at:
            for mode, (address, key) in callers.items():
                for turn in range(TURN):
                    text = cached if repeat else sentence(i, f"{run}-{mode}")
                    request = gateway_pb2.InferRequest(model=MODEL, texts=[text], options=options)
                    sent = time.perf_counter()
                    await stubs[address].Infer(request, timeout=30, metadata=_bearer(key))
                    if turn:  # the first of a turn may find its gateway idle since its last
                        latencies[mode].append((time.perf_counter() - sent) * 1e3)
                    i += 1
        elapsed = time.perf_counter() - started
    finally:
        for channel in channels.values():
            await channel.close()
    return {mode: Load(len(ms), elapsed, ms) for mode, ms in latencies.items()}


def _bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),) if key else ()


def admit_calls(metrics_port: int) -> float:
    """Limit checks the cache service has answered so far (its Admit calls)."""
    samples = scrape(metrics_port)
    return samples.get(("fmserve_cache_request_duration_seconds_count", "Admit"), 0.0)


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
            checks = cpu_ms[(path, mode, 32), "checks"]
            line = (
                f"  {mode:<16} c=1 p50 {c1.pct(0.5):6.2f} ms   c=32 {c32.rate:7.1f} req/s"
                f"   CPU ms/req {cpu:5.2f} (front {front:4.2f})   limit checks/req {checks:5.3f}"
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

    def __init__(self, key: apikeys.NewKey, rpm: int = 0) -> None:
        info = keys_pb2.ApiKeyInfo(key_id=key.key_id, name="bench", scopes=["infer:*"], rpm=rpm)
        self.stored = keys_pb2.StoredKey(info=info, salt=key.salt, hash=key.digest)

    async def get(self, key_id: str) -> keys_pb2.StoredKey:
        return self.stored


@dataclass
class _Details:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


async def interceptor_cpu_us(rpm: int = 0, calls: int = 20_000) -> float:
    """CPU microseconds the auth interceptor adds to a unary call, in this process: a cached
    key without limits, or (`rpm`) with a rate limit whose tokens this replica holds leased,
    as a busy key's calls find them (no call to the cache service)."""
    key = apikeys.generate()
    table = AccessTable(lambda _: "embedding", lambda _: (0, 0))
    admission: Admission = AdmitAll()
    if rpm:
        limits = KeyLimits(LimitsClient("127.0.0.1:1", 1.0, 1 << 20), 30.0, 0)
        admission = limits
    auth = AuthInterceptor(KeyRing(_OneKey(key, rpm), 60.0), table, admission)  # type: ignore[arg-type]

    async def answer(request: object, context: object) -> object:
        return request

    handler = grpc.unary_unary_rpc_method_handler(answer)

    async def continuation(_: object) -> grpc.RpcMethodHandler:
        return handler

    details = _Details("/fmserve.v1.Gateway/Infer")
    request = gateway_pb2.InferRequest(model=MODEL, texts=["a sentence"])
    # as the service interceptor binds it for each call
    call_context.metadata.set((("user-agent", "bench"), ("authorization", f"Bearer {key.api_key}")))

    async def run(intercepted: bool) -> float:
        started = time.process_time()
        for _ in range(calls):
            if rpm:  # a lease as one check of the cache service would leave it, never used up
                claim = limits.claim(await auth.keyring.authenticate(key.api_key), MODEL, 1)
                assert claim is not None
                limits.leases.keep(claim, limits_pb2.Verdict(admitted=True, taken=[calls + 1]))
            if intercepted:
                wrapped = await auth.intercept_service(continuation, details)  # type: ignore[arg-type]
            else:
                wrapped = await continuation(details)
            await wrapped.unary_unary(request, None)
        return (time.process_time() - started) / calls * 1e6

    await run(True)  # the key verified and cached, as for a busy key
    return await run(True) - await run(False)


class _Answering(gateway_pb2_grpc.GatewayServicer):
    async def Infer(
        self, request: gateway_pb2.InferRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.InferResponse:
        return gateway_pb2.InferResponse()


def _serve(key: apikeys.NewKey | None, ports: multiprocessing.Queue[int]) -> None:
    """A gateway-shaped server, in a process of its own: Infer answers at once, behind the
    service interceptor and, given a key, the auth interceptor that knows it (no limits)."""

    async def serve() -> None:
        interceptors: list[grpc.aio.ServerInterceptor] = [
            ServiceInterceptor("gateway", RpcMetrics("gateway"))
        ]
        if key is not None:
            table = AccessTable(lambda _: "embedding", lambda _: (0, 0))
            keyring = KeyRing(_OneKey(key), 60.0)  # type: ignore[arg-type]
            interceptors.append(AuthInterceptor(keyring, table, AdmitAll()))
        server = grpc.aio.server(interceptors=interceptors)
        gateway_pb2_grpc.add_GatewayServicer_to_server(_Answering(), server)
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


def server_cpu_us(rounds: int = 6, seconds: float = 3.0) -> tuple[float, float]:
    """The server CPU of one Infer call without and with the auth layer (a cached key), on two
    real gRPC servers whose handler does nothing, loaded at concurrency 32 in turns: what
    auth costs the gateway per call, gRPC's part (metadata, one more interceptor) included."""
    key = apikeys.generate()
    spawn = multiprocessing.get_context("spawn")
    servers = {}
    for mode, known in (("off", None), ("on", key)):
        ports: multiprocessing.Queue[int] = spawn.Queue()
        process = spawn.Process(target=_serve, args=(known, ports), daemon=True)
        process.start()
        servers[mode] = (process, ports.get(timeout=60))
    spent: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for round_ in range(rounds):
            for mode in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                process, port = servers[mode]
                api_key = key.api_key if mode == "on" else ""
                pid = process.pid
                assert pid is not None
                spent[mode].append(asyncio.run(_calls_cpu_us(port, pid, api_key, seconds)))
    finally:
        for process, _ in servers.values():
            process.kill()
            process.join()
    return statistics.median(spent["off"]), statistics.median(spent["on"])


async def _calls_cpu_us(port: int, pid: int, api_key: str, seconds: float) -> float:
    """Server CPU microseconds per call over `seconds` of 32 callers (after as long warming)."""
    request = gateway_pb2.InferRequest(model=MODEL, texts=["a sentence"])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def calls() -> int:
            done, stop_at = 0, time.perf_counter() + seconds
            while time.perf_counter() < stop_at:
                await stub.Infer(request, timeout=10, metadata=_bearer(api_key))
                done += 1
            return done

        await asyncio.gather(*(calls() for _ in range(32)))
        before = cpu_s([pid])
        done = sum(await asyncio.gather(*(calls() for _ in range(32))))
        return (cpu_s([pid]) - before) / done * 1e6


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
            MODES[1]: (off, ""),
            MODES[2]: (on, free),
            MODES[3]: (on, rpm),
            MODES[4]: (on, every),
        }
        pids = {
            "cluster": [r.process.pid for r in cluster.all() if r.process],
            "front": [
                r.process.pid
                for r in cluster.replicas_of["gateway"] + cluster.replicas_of["cache"]
                if r.process
            ],
        }
        cache_port = cluster.replicas_of["cache"][0].metrics_port
        loads, cpu_ms = asyncio.run(
            measure(callers, args.seconds, args.rounds, paths, pids, cache_port)
        )
    finally:
        cluster.stop()
        forget(prefix)
    report(loads, cpu_ms, paths)
    bare, authed = server_cpu_us()
    print(
        f"\nthe auth layer on a gRPC server whose Infer does nothing (a cached key, no limits): "
        f"{authed:.0f} CPU us/call against {bare:.0f} without, {authed - bare:+.0f} us"
    )
    added = asyncio.run(interceptor_cpu_us())
    leased = asyncio.run(interceptor_cpu_us(rpm=UNREACHED["rpm"]))
    print(
        f"the auth interceptor alone, in one process: a cached key, no limits {added:.1f} CPU "
        f"us/call; with an rpm limit, its tokens leased {leased:.1f} CPU us/call"
    )


if __name__ == "__main__":
    main()
