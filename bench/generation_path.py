"""Benchmark: the per-token cost of the generation path's hops. The same requests (smollm2, chat
questions of about 30 tokens, greedy) streamed straight from the inference service
(ModelStreamInfer) and through the whole cluster (gateway Generate: preprocess EncodePrompt,
inference, postprocess Detokenize), at concurrency 1 and 16, beside bench.generation's in-process
`model.generate` baseline.

    python -m bench.generation_path [--requests 8] [--new-tokens 64]

Both paths run against one cluster (`fmserve up`'s code path; the cache is bypassed), so the
difference between the two rows of a concurrency is what the gateway and postprocess hops add."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2_grpc

from bench.generation import MODEL, QUESTIONS, REPOSITORY, Run, in_process, one_stream, prompts
from bench.generation import report as report_run
from fmserve.cli.cluster import SERVICES, Cluster, free_port
from fmserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

STAGES = ("preprocess", "inference", "postprocess")


def generate_request(index: int, new_tokens: int) -> gateway_pb2.GenerateRequest:
    question = QUESTIONS[index % len(QUESTIONS)]
    return gateway_pb2.GenerateRequest(
        model=MODEL,
        messages=[common_pb2.ChatMessage(role="user", content=question)],
        parameters=common_pb2.SamplingParameters(max_new_tokens=new_tokens),
        cache_policy=common_pb2.CACHE_POLICY_BYPASS,
    )


async def one_generate(stub: object, request: gateway_pb2.GenerateRequest, run: Run) -> None:
    started = last = time.perf_counter()
    first = True
    async for reply in stub.Generate(request):  # type: ignore[attr-defined]
        count = len(reply.delta.token_ids) if reply.HasField("delta") else 0
        if not count:
            continue
        now = time.perf_counter()
        if first:
            run.first_ms.append((now - started) * 1e3)
            first = False
        else:
            run.gaps_ms.append((now - last) * 1e3 / count)
        run.tokens += count
        last = now


async def load(address: str, count: int, new_tokens: int, c: int, gateway: bool) -> Run:
    ids = prompts(count)
    async with grpc.aio.insecure_channel(address) as channel:
        if gateway:
            stub: object = gateway_pb2_grpc.GatewayStub(channel)
            warm = one_generate(stub, generate_request(0, 4), Run())
        else:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            warm = one_stream(stub, ids[0], 4, Run())
        await warm
        run, pending = Run(), list(range(count))

        async def worker() -> None:
            while pending:
                i = pending.pop()
                if gateway:
                    await one_generate(stub, generate_request(i, new_tokens), run)
                else:
                    await one_stream(stub, ids[i], new_tokens, run)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        run.seconds = time.perf_counter() - started
        return run


def start_cluster() -> Cluster:
    env = {
        "FMSERVE_MODEL_REPOSITORY": str(REPOSITORY),
        "FMSERVE_INFERENCE_PRELOAD": MODEL,
        "FMSERVE_PREPROCESS_PRELOAD": MODEL,
        "FMSERVE_LOG_LEVEL": "WARNING",
        # The synchronous path only: no job queues, so the run leaves nothing in RabbitMQ.
        "FMSERVE_GATEWAY_JOBS_ENABLED": "false",
        **{f"FMSERVE_{s.upper()}_WORKER_ENABLED": "false" for s in STAGES},
        "FMSERVE_CACHE_KEY_PREFIX": f"fmserve-bench-{uuid.uuid4().hex[:8]}:",
    }
    ports = {name: free_port() for name in SERVICES}
    log_dir = Path(tempfile.mkdtemp(prefix="fmserve-bench-"))
    cluster = Cluster(env=env, ports=ports, log_dir=log_dir, say=lambda _: None)
    cluster.start()
    return cluster


async def main(count: int, new_tokens: int) -> None:
    requests = prompts(count)
    print(f"{len(requests)} prompts of {statistics.fmean(map(len, requests)):.0f} tokens (mean)")
    base, prefill_ms = in_process(requests, new_tokens)
    cluster = start_cluster()
    runs: dict[str, Run] = {}
    try:
        for c in (1, 16):
            n = count if c == 1 else max(count, 32)
            for name, address, gateway in (
                ("inference", cluster.address("inference"), False),
                ("gateway", cluster.address("gateway"), True),
            ):
                runs[f"{name} c={c}"] = await load(address, n, new_tokens, c, gateway)
    finally:
        cluster.stop(grace_s=5)
    report_run("in-process generate", base, base, prefill_ms)
    for name, run in runs.items():
        report_run(name, run, base, prefill_ms)
    for c in (1, 16):
        direct, through = runs[f"inference c={c}"], runs[f"gateway c={c}"]
        print(
            f"hops at c={c}: +{through.itl_ms - direct.itl_ms:5.2f} ms per token, "
            f"+{through.ttft_ms - direct.ttft_ms:5.1f} ms to the first token"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.new_tokens))
