"""Per-key limits through the five services with auth on: a key with rpm=60 sending 120
requests in 10 s is allowed its burst plus the refill and refused the rest, each refusal with a
`retry-after-ms` trailer and counted in the gateway's metrics exactly as the client counted it;
a concurrency limit, its slots given back when a client leaves or its deadline passes; a daily
quota that generations spend in tokens (max_new_tokens reserved, the unspent given back); and
when Redis stops, keys with limits are refused UNAVAILABLE while keys without limits go on.

It runs on a cluster of its own (this module's): auth on, the cheapest models, and a Redis of
its own on a free port, which the last test stops. Keys are verified once per 60 s here
(FMSERVE_GATEWAY_KEY_CACHE_S), so that with Redis stopped the gateway still knows its callers
and what fails is the limits check alone."""

from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fmserve.cli.cluster import SERVICES, Cluster, free_port
from fmserve.core import apikeys
from fmserve.queue.topology import delete_queues
from fmserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, jobs_pb2, keys_pb2
from tests.conftest import AMQP_URL, require_binary, require_server
from tests.e2e.conftest import topology
from tests.models import GENERATION_TOML, build_causal_lm, build_classifier

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

MODEL = "tiny-classifier"
LM = "tiny-llama"
ADMIN_KEY = apikeys.generate().api_key


@pytest.fixture(scope="module")
def redis_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def own_redis(redis_port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A Redis of this module's own (no persistence), on a free port; the last test stops it."""
    port = redis_port
    server = subprocess.Popen(
        [require_binary("redis-server", "redis-server"), "--port", str(port), "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    yield server
    server.kill()
    server.wait()


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, own_redis: subprocess.Popen[bytes], redis_port: int
) -> Iterator[Cluster]:
    require_server("RabbitMQ", "127.0.0.1", 5672)
    models = tmp_path_factory.mktemp("models")
    build_classifier(models / MODEL / "1", seed=1)
    (models / MODEL / "model.toml").write_text('task = "text-classification"\nmax_length = 64\n')
    build_causal_lm(models / LM / "1", seed=5)
    (models / LM / "model.toml").write_text(GENERATION_TOML)
    key_prefix = f"fmserve-e2e-limits-{uuid.uuid4().hex[:8]}:"
    env = {
        "FMSERVE_AUTH": "on",
        "FMSERVE_ADMIN_KEY": ADMIN_KEY,
        "FMSERVE_GATEWAY_KEY_CACHE_S": "60",
        "FMSERVE_AMQP_URL": AMQP_URL,
        "FMSERVE_AMQP_QUEUE_PREFIX": key_prefix.replace(":", "."),
        "FMSERVE_MODEL_REPOSITORY": str(models),
        "FMSERVE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "FMSERVE_CACHE_KEY_PREFIX": key_prefix,
        "FMSERVE_INFERENCE_PRELOAD": f"{MODEL},{LM}",
        "FMSERVE_PREPROCESS_PRELOAD": f"{MODEL},{LM}",
        "FMSERVE_INFERENCE_TORCH_THREADS": "1",
        "FMSERVE_LOG_LEVEL": "INFO",
    }
    ports = {name: free_port() for name in SERVICES}
    cluster = Cluster(
        env=env, ports=ports, log_dir=tmp_path_factory.mktemp("logs"), say=lambda _: None
    )
    try:
        cluster.start(timeout_s=120)
        yield cluster
    finally:
        cluster.stop(grace_s=5)
        with ThreadPoolExecutor(1) as thread:  # this thread's loop belongs to pytest-asyncio
            thread.submit(asyncio.run, delete_queues(AMQP_URL, topology(key_prefix))).result()


@pytest.fixture
async def gateway(cluster: Cluster) -> AsyncIterator[gateway_pb2_grpc.GatewayStub]:
    async with grpc.aio.insecure_channel(cluster.address("gateway")) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def bearer(api_key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {api_key}"),)


async def new_key(gateway: gateway_pb2_grpc.GatewayStub, **limits: int) -> tuple[str, str]:
    """(name, key) of a new key that may infer, submit and read jobs, with `limits`."""
    name = f"limits-{uuid.uuid4().hex[:8]}"
    request = keys_pb2.CreateApiKeyRequest(
        name=name, scopes=["infer:*", "jobs:submit", "jobs:read"], **limits
    )
    reply = await gateway.CreateApiKey(request, metadata=bearer(ADMIN_KEY), timeout=10)
    return name, reply.api_key


def infer(gateway: gateway_pb2_grpc.GatewayStub, api_key: str) -> grpc.aio.UnaryUnaryCall:
    request = gateway_pb2.InferRequest(model=MODEL, texts=["a short text"])
    return gateway.Infer(request, metadata=bearer(api_key), timeout=10)


def refusals(cluster: Cluster, name: str) -> dict[str, float]:
    """The gateway's count of refusals of key `name`, by reason."""
    port = cluster.replicas_of["gateway"][0].metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "fmserve_gateway_limit_refusals"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["key_name"] == name
    }


async def test_rpm_60_allows_the_burst_plus_the_refill_and_refuses_the_rest(
    cluster: Cluster, gateway: gateway_pb2_grpc.GatewayStub
) -> None:
    name, key = await new_key(gateway, rpm=60)
    spans, allowed, refused = [], 0, 0
    started = time.monotonic()
    for sent in range(120):
        await asyncio.sleep(max(0.0, started + sent / 12 - time.monotonic()))  # 12 a second
        began = time.monotonic()
        call = infer(gateway, key)
        try:
            await call
            allowed += 1
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
            assert "limit of 60 requests per minute" in (exc.details() or "")
            trailing = dict(exc.trailing_metadata() or ())
            assert 0 < int(trailing["retry-after-ms"]) <= 1000
            refused += 1
        spans.append((began, time.monotonic()))
    elapsed = spans[-1][1] - spans[0][0]
    assert elapsed < 11.0
    # A burst of 60, then one a second: between the first and the last call Redis saw.
    shortest, longest = spans[-1][0] - spans[0][1], elapsed
    assert 60 + int(shortest) <= allowed <= 60 + longest, (allowed, shortest, longest)
    assert allowed + refused == 120
    assert refusals(cluster, name) == {"rate": refused}


async def test_a_concurrency_limit_holds_until_a_client_leaves_or_its_deadline_passes(
    cluster: Cluster, gateway: gateway_pb2_grpc.GatewayStub
) -> None:
    name, key = await new_key(gateway, max_concurrency=2)
    leave = asyncio.Event()

    async def header_then_wait() -> AsyncIterator[gateway_pb2.SubmitJobRequest]:
        yield gateway_pb2.SubmitJobRequest(header=gateway_pb2.JobHeader(model=MODEL))
        await leave.wait()  # the submission stays open, its call holding a slot

    open_submission = gateway.SubmitJob(header_then_wait(), metadata=bearer(key), timeout=60)
    timed = gateway.SubmitJob(header_then_wait(), metadata=bearer(key), timeout=2)
    await asyncio.sleep(1.0)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await infer(gateway, key)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "already has 2 calls running" in (refused.value.details() or "")
    assert dict(refused.value.trailing_metadata() or ())["retry-after-ms"] == "100"

    with pytest.raises(grpc.aio.AioRpcError) as late:
        await timed
    assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await until_admitted(gateway, key)  # the deadline freed a slot
    open_submission.cancel()
    await until_admitted(gateway, key)
    await until_admitted(gateway, key)  # both slots free: two calls at once are admitted
    both = await asyncio.gather(*[infer(gateway, key) for _ in range(2)])
    assert len(both) == 2
    assert refusals(cluster, name)["concurrency"] >= 1


async def generate(
    gateway: gateway_pb2_grpc.GatewayStub, key: str, max_new_tokens: int, prompt: str = "hello"
) -> common_pb2.Generation:
    """A greedy generation (the cache bypassed: every one runs the model)."""
    request = gateway_pb2.GenerateRequest(
        model=LM,
        prompt=prompt,
        parameters=common_pb2.SamplingParameters(max_new_tokens=max_new_tokens),
        cache_policy=common_pb2.CACHE_POLICY_BYPASS,
    )
    replies = [r async for r in gateway.Generate(request, metadata=bearer(key), timeout=60)]
    return replies[-1].result.generation


async def test_generations_spend_a_daily_quota_in_tokens_and_give_back_what_they_did_not_use(
    cluster: Cluster, gateway: gateway_pb2_grpc.GatewayStub
) -> None:
    name, key = await new_key(gateway, daily_items=40)
    refused = 0

    async def over_quota(max_new_tokens: int, says: str) -> None:
        nonlocal refused
        with pytest.raises(grpc.aio.AioRpcError) as over:
            await generate(gateway, key, max_new_tokens)
        assert over.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, over.value.details()
        assert says in (over.value.details() or "")
        assert int(dict(over.value.trailing_metadata() or ())["retry-after-ms"]) > 0
        refused += 1

    async def fits(max_new_tokens: int) -> common_pb2.Generation:
        """Admitted once what earlier generations did not spend is back (just after they end)."""
        nonlocal refused
        for _ in range(40):
            try:
                return await generate(gateway, key, max_new_tokens)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                refused += 1
            await asyncio.sleep(0.05)
        pytest.fail(f"{max_new_tokens} tokens never fit")

    await over_quota(41, "this generation reserves 41 tokens (max_new_tokens): ask for fewer")
    # Refused by preprocess after admission (prompt and max_new_tokens over the context): its
    # 30 reserved tokens all come back.
    with pytest.raises(grpc.aio.AioRpcError) as too_long:
        await generate(gateway, key, 30, prompt="hello " * 300)
    assert too_long.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    first = await fits(12)
    spent = first.usage.completion_tokens
    assert 0 < spent <= 12 and spent == len(first.token_ids)
    second = await fits(40 - spent)  # fits only once the 30 and any unspent came back
    spent += second.usage.completion_tokens
    await over_quota(40 - spent + 1, "of its 40 items today")
    assert refusals(cluster, name) == {"quota": refused}


async def submit(
    gateway: gateway_pb2_grpc.GatewayStub, key: str, header: gateway_pb2.JobHeader, texts: int
) -> jobs_pb2.Job:
    async def stream() -> AsyncIterator[gateway_pb2.SubmitJobRequest]:
        yield gateway_pb2.SubmitJobRequest(header=header)
        items = gateway_pb2.JobItems(texts=[f"text {i}" for i in range(texts)])
        yield gateway_pb2.SubmitJobRequest(items=items)

    return await gateway.SubmitJob(stream(), metadata=bearer(key), timeout=30)


async def refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_jobs_spend_a_daily_quota_when_admitted_and_must_declare_their_size(
    cluster: Cluster, gateway: gateway_pb2_grpc.GatewayStub
) -> None:
    name, key = await new_key(gateway, daily_items=10)

    def header(expected: int) -> gateway_pb2.JobHeader:
        return gateway_pb2.JobHeader(model=MODEL, expected_items=expected)

    # Undeclared, its items could not be charged when it is admitted: refused before any item.
    undeclared = await refused(submit(gateway, key, header(0), 3))
    assert undeclared.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "expected_items" in (undeclared.details() or "") and name in undeclared.details()
    # A job may not send more than it declared (and was charged for).
    more = await refused(submit(gateway, key, header(2), 3))
    assert more.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "more items than the 2 its header declared" in (more.details() or "")
    assert (await submit(gateway, key, header(4), 4)).id
    over = await refused(submit(gateway, key, header(5), 5))  # 2 + 4 + 5 > 10
    assert over.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "of its 10 items today" in (over.details() or "")
    assert refusals(cluster, name) == {"quota": 1}


async def test_a_generation_job_spends_max_new_tokens_per_prompt_of_the_quota(
    gateway: gateway_pb2_grpc.GatewayStub,
) -> None:
    _, key = await new_key(gateway, daily_items=40)
    sampling = common_pb2.SamplingParameters(max_new_tokens=16)

    def header(prompts: int) -> gateway_pb2.JobHeader:
        return gateway_pb2.JobHeader(
            model=LM, task=common_pb2.TASK_TEXT_GENERATION, expected_items=prompts,
            parameters=sampling,
        )  # fmt: skip

    assert (await submit(gateway, key, header(2), 2)).id  # 32 of 40 tokens
    over = await refused(submit(gateway, key, header(1), 1))  # 16 more do not fit
    assert over.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


async def until_admitted(gateway: gateway_pb2_grpc.GatewayStub, key: str) -> None:
    """Slots are given back just after a call ends: within a second."""
    for _ in range(20):
        try:
            await infer(gateway, key)
            return
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        await asyncio.sleep(0.05)
    pytest.fail("no slot was given back")


async def test_when_redis_stops_limited_keys_are_refused_and_others_go_on(
    cluster: Cluster,
    gateway: gateway_pb2_grpc.GatewayStub,
    own_redis: subprocess.Popen[bytes],
) -> None:
    limited_name, limited = await new_key(gateway, rpm=1000, daily_items=1000)
    _, free = await new_key(gateway)
    for key in (limited, free):
        await infer(gateway, key)  # both keys verified, and cached by the gateway
    own_redis.terminate()
    own_redis.wait()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await infer(gateway, limited)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "limits cannot be checked" in (refused.value.details() or "")
    reply: gateway_pb2.InferResponse = await infer(gateway, free)
    assert reply.model == MODEL
    assert refusals(cluster, limited_name) == {"unavailable": 1}
