"""Preloading in the preprocess service: the tokenizers of FMSERVE_PREPROCESS_PRELOAD's models
load and warm up before the service reports SERVING, so its first request loads nothing; a model
that cannot load is logged and the service still serves the others."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from fmserve.v1 import preprocess_pb2, preprocess_pb2_grpc
from services.preprocess.__main__ import build
from services.preprocess.settings import PreprocessSettings

pytestmark = pytest.mark.timeout(60)


def loads(model: str) -> float:
    labels = {"model": model, "outcome": "ok"}
    return REGISTRY.get_sample_value("fmserve_preprocess_tokenizer_loads_total", labels) or 0.0


async def test_preloaded_tokenizers_are_ready_before_serving(
    model_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = PreprocessSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        grace_period_s=1.0,
        model_repository=model_repository,
        worker_enabled=False,
        preload="minilm-embed, no-such-model",
    )
    before = loads("minilm-embed")
    service = build(settings)
    with caplog.at_level(logging.ERROR):
        await service.start()
    try:
        assert loads("minilm-embed") == before + 1  # loaded during start
        assert any("no-such-model" in str(r.__dict__.get("model")) for r in caplog.records)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = preprocess_pb2_grpc.PreprocessStub(channel)
            request = preprocess_pb2.TokenizeRequest(model="minilm-embed", texts=["first call"])
            reply = await stub.Tokenize(request, timeout=10)
        assert list(reply.lengths.shape) == [1]
        assert loads("minilm-embed") == before + 1  # nothing more loaded for it
    finally:
        await service.stop()
