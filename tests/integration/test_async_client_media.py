"""The async client reads and encodes media off the event loop: while a slow item is read for
`infer_media` or `submit_media`, the caller's other coroutines keep running. Against a real
grpc.aio server that answers the gateway's Infer and SubmitJob and records what it received."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from fmserve.client import AsyncClient, wire
from fmserve.v1 import gateway_pb2, gateway_pb2_grpc, jobs_pb2

pytestmark = pytest.mark.timeout(30)

SLOW_S = 0.4


class _Gateway(gateway_pb2_grpc.GatewayServicer):
    def __init__(self) -> None:
        self.media: list[bytes] = []

    async def Infer(
        self, request: gateway_pb2.InferRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.InferResponse:
        self.media.extend(m.data for m in request.media)
        return gateway_pb2.InferResponse(model=request.model)

    async def SubmitJob(self, requests: Any, context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        async for request in requests:
            if request.WhichOneof("part") == "items":
                self.media.extend(m.data for m in request.items.media)
        return jobs_pb2.Job(id="job-1")


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[str, _Gateway]]:
    servicer = _Gateway()
    server = grpc.aio.server()
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", servicer
    await server.stop(None)


async def _ticks_during(work: Any) -> tuple[Any, int]:
    """Run `work` and count how often a 20 ms ticker ran on the event loop meanwhile."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        return await work, ticks
    finally:
        task.cancel()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "pixel.png"
    path.write_bytes(bytes.fromhex("89504e470d0a1a0a") + b"not decoded by the client")
    return path


async def test_infer_media_reads_its_items_off_the_event_loop(
    gateway: tuple[str, _Gateway], image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address, servicer = gateway
    encode = wire.media_request

    def slow_encode(*args: Any) -> gateway_pb2.InferRequest:
        time.sleep(SLOW_S)  # a file on a slow disk, a big image to encode
        return encode(*args)

    monkeypatch.setattr(wire, "media_request", slow_encode)
    async with AsyncClient(address, timeout=10) as client:
        answer, ticks = await _ticks_during(
            client.infer_media(image, "vit", task="image-classification")
        )

    assert answer.model == "vit"
    assert servicer.media == [image.read_bytes()]
    assert ticks >= SLOW_S / 0.02 / 2  # the loop ran through the read, not after it


async def test_submit_media_reads_each_chunk_off_the_event_loop(
    gateway: tuple[str, _Gateway], image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address, servicer = gateway
    chunks = wire.media_chunks

    def slow_chunks(*args: Any) -> Iterator[gateway_pb2.SubmitJobRequest]:
        for chunk in chunks(*args):
            time.sleep(SLOW_S)
            yield chunk

    monkeypatch.setattr(wire, "media_chunks", slow_chunks)
    async with AsyncClient(address, timeout=10) as client:
        job, ticks = await _ticks_during(client.submit_media([image, image], "vit"))

    assert job.id == "job-1"
    assert servicer.media == [image.read_bytes()] * 2
    assert ticks >= SLOW_S / 0.02 / 2
