"""A burst against the whole gateway (the service `services/gateway/__main__.py` builds,
in-process on a free port) over fake stages: calls with 20-50 ms deadlines, a slow stage,
clients that cancel, repeated texts and refused ones. Every caller hears exactly one outcome,
and asyncio has nothing to report: no future or task is left holding an exception nobody
retrieved (each would be an ERROR line, "exception was never retrieved", in the gateway's log).

The calls come in waves of 200 at once: 2,000 at once all expire inside gRPC before the gateway
sees them, which tests nothing of the gateway."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fmserve.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.__main__ import build
from tests.conftest import AsyncioReports
from tests.integration.stage_fakes import REFUSED_WORD, Fakes, expected, fake_stages

pytestmark = pytest.mark.timeout(60)

CALLS = 2000
WAVE = 200
SLOW_STAGE_S = 0.03


@dataclass
class Call:
    texts: list[str]
    timeout_s: float
    cancel_after_s: float | None
    outcomes: list[str]
    """What the caller heard: one status code name, or "CANCELLED" when it cancelled."""

    @property
    def patient(self) -> bool:
        """Whether it waits long enough to be answered and does not give up."""
        return self.timeout_s > 1 and self.cancel_after_s is None


def plan(rng: random.Random, i: int) -> Call:
    texts = [f"shared text {i % 50}", f"own text {i}"]  # shared ones are in flight at once
    if i % 13 == 0:
        texts.append(REFUSED_WORD)  # preprocess refuses it: INVALID_ARGUMENT, alone
    timeout_s = 2.0 if i % 10 == 0 else rng.uniform(0.02, 0.05)
    cancel_after_s = rng.uniform(0.0, 0.04) if rng.random() < 0.2 else None
    return Call(texts, timeout_s, cancel_after_s, [])


async def place(stub: gateway_pb2_grpc.GatewayStub, call: Call) -> None:
    request = gateway_pb2.InferRequest(model="embedder", texts=call.texts)
    rpc = stub.Infer(request, timeout=call.timeout_s)
    if call.cancel_after_s is not None:
        asyncio.get_running_loop().call_later(call.cancel_after_s, rpc.cancel)
    try:
        reply = await rpc
    except asyncio.CancelledError:  # grpc.aio raises this to the side that cancelled
        call.outcomes.append("CANCELLED")
    except grpc.aio.AioRpcError as exc:
        call.outcomes.append(exc.code().name)
    else:
        assert [list(r.embedding.values) for r in reply.results] == [
            expected(t) for t in call.texts
        ]
        call.outcomes.append("OK")


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    (tmp_path / "embedder" / "1").mkdir(parents=True)
    (tmp_path / "embedder" / "model.toml").write_text('task = "embedding"\n')
    (tmp_path / "embedder" / "1" / "config.json").write_text('{"hidden_size": 2}')
    return tmp_path


@pytest.fixture
async def gateway(repository: Path) -> AsyncIterator[tuple[Fakes, str]]:
    """The gateway service over the fakes (no jobs: this is the synchronous path)."""
    async with fake_stages() as fakes:
        settings = fakes.settings(
            host="127.0.0.1",
            port=0,
            metrics_port=-1,
            grace_period_s=1.0,
            jobs_enabled=False,
            model_repository=repository,
        )
        service = build(settings)
        await service.start()
        try:
            yield fakes, f"127.0.0.1:{service.port}"
        finally:
            await service.stop()


async def test_a_burst_with_short_deadlines_and_cancels_leaves_nothing_unretrieved(
    gateway: tuple[Fakes, str], asyncio_reports: AsyncioReports
) -> None:
    fakes, address = gateway
    fakes.inference.delay_s = SLOW_STAGE_S
    rng = random.Random(8)
    calls = [plan(rng, i) for i in range(CALLS)]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        await stub.Infer(gateway_pb2.InferRequest(model="embedder", texts=["a b"]), timeout=5)
        for start in range(0, CALLS, WAVE):
            await asyncio.gather(*(place(stub, call) for call in calls[start : start + WAVE]))
    assert [len(call.outcomes) for call in calls] == [1] * CALLS
    seen = Counter(call.outcomes[0] for call in calls)
    assert set(seen) <= {"OK", "DEADLINE_EXCEEDED", "CANCELLED", "INVALID_ARGUMENT"}, seen
    # The burst went through every path: answered, expired, cancelled, refused.
    assert min(seen.values()) > 0 and len(seen) == 4, seen
    for call in calls:  # those that wait are answered, whatever the others did
        if call.patient:
            refused = REFUSED_WORD in call.texts
            assert call.outcomes == ["INVALID_ARGUMENT" if refused else "OK"], call
    assert await asyncio_reports.messages() == []
