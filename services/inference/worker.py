"""The inference stage of the asynchronous path: runs each queued chunk through the model's
dynamic batcher (the same one sync traffic uses) at background priority, so job work fills the
gaps, in batches paced to be short (instance.py), and interactive requests never wait long
behind it; forwards the outputs to postprocess."""

from __future__ import annotations

from typing import Any

import numpy as np

from fmserve.core import tensors
from fmserve.queue.stage_worker import stage_resources
from fmserve.v1 import jobs_pb2
from services.inference.instance import BACKGROUND_PRIORITY, InferRequest
from services.inference.ragged import split_ragged
from services.inference.registry import ModelRegistry
from services.inference.settings import InferenceSettings


def worker_resources(settings: InferenceSettings, registry: ModelRegistry) -> list[Any]:
    async def infer(chunk: jobs_pb2.JobChunk) -> jobs_pb2.JobChunk:
        route = chunk.route
        ids = tensors.to_domain(chunk.input_ids, "input_ids")
        lengths = tensors.to_domain(chunk.lengths, "lengths")
        sequences, layout = split_ragged(ids, lengths)
        instance = await registry.instance(route.model, route.version)
        request = InferRequest(
            route.model, route.version, sequences, layout, priority=BACKGROUND_PRIORITY
        )
        output = await instance.infer(request)
        out = jobs_pb2.JobChunk()
        out.CopyFrom(chunk)
        out.ClearField("input_ids")  # postprocess needs lengths and offsets, not the ids
        out.output.CopyFrom(tensors.to_wire(np.asarray(output.array, dtype=np.float32)))
        return out

    return stage_resources("inference", settings, infer, None)
