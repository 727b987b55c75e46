"""Memory after overload: bursts of concurrent ModelInfer calls of varied shapes (some given up
by their deadline) against the in-process inference service. glibc keeps what a burst freed
(torch's activations of every shape) in its heaps; the service hands it back once its models
go idle, so what an explicit trim could still release afterwards stays small. RSS is measured,
never time."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import platform
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc.aio as triton
from prometheus_client import REGISTRY
from tritonclient.grpc import InferInput

from tests.integration.test_inference_service import start
from tests.processes import rss_mib

pytestmark = pytest.mark.timeout(180)
torch.set_num_threads(1)

MODEL = "minilm-embed"
BURSTS = 3
REQUESTS = 16  # concurrent calls per burst, each [ROWS, T] with its own T
ROWS = 4
HELD_MB = 24.0
"""Most heap a trim may still release once the model went idle: without trimming a burst
leaves 40-200 MB there (free, yet resident)."""


def released_by_trim_mb() -> float:
    """RSS that glibc's malloc_trim returns to the OS now: free heap it was still holding."""
    libc = ctypes.CDLL(None)
    gc.collect()
    before = rss_mib()
    libc.malloc_trim(0)
    return before - rss_mib()


def request(rng: np.random.Generator) -> list[InferInput]:
    length = int(rng.integers(16, 128))
    ids = rng.integers(1000, 20000, (ROWS, length), dtype=np.int64)
    mask = np.ones_like(ids)
    inputs = [InferInput("input_ids", list(ids.shape), "INT64")]
    inputs.append(InferInput("attention_mask", list(mask.shape), "INT64"))
    inputs[0].set_data_from_numpy(ids)
    inputs[1].set_data_from_numpy(mask)
    return inputs


async def burst(client: triton.InferenceServerClient, rng: np.random.Generator) -> int:
    """One overload burst; returns how many calls were answered (the rest ran out of time)."""
    calls = [
        client.infer(MODEL, request(rng), client_timeout=1.0 if i % 4 == 0 else None)
        for i in range(REQUESTS)
    ]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    return sum(not isinstance(outcome, Exception) for outcome in outcomes)


def trims() -> float:
    return REGISTRY.get_sample_value("fmserve_inference_heap_trims_total") or 0.0


async def until_trimmed(since: float) -> None:
    """Wait (10 s at most) for the trim that follows the burst; the check is on memory."""
    for _ in range(100):
        if trims() > since:
            return
        await asyncio.sleep(0.1)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="measures glibc's malloc")
async def test_memory_freed_by_bursts_goes_back_once_the_model_is_idle(
    model_repository: Path,
) -> None:
    # What earlier tests in this process freed is not the bursts' to give back: trim it first.
    released_by_trim_mb()
    service = await start(model_repository, heap_trim_idle_s=0.1)
    rng = np.random.default_rng(7)
    held = []
    try:
        async with triton.InferenceServerClient(f"127.0.0.1:{service.port}") as client:
            for _ in range(BURSTS):
                before = trims()
                assert await burst(client, rng) > 0
                await until_trimmed(before)
                held.append(released_by_trim_mb())
    finally:
        await service.stop()
    assert max(held) < HELD_MB, f"MB a trim still released after each burst: {held}"
