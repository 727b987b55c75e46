"""The inference stage of the asynchronous path: runs each queued chunk (token ids, or a media
chunk's featurized inputs) through the model's dynamic batcher (the same one sync traffic uses)
at background priority, so job work fills the gaps, in batches paced to be short (instance.py),
and interactive requests never wait long behind it; forwards the outputs (with each clip's
frames for a per-frame task) to postprocess. A text-generation job's chunk runs on the
model's scheduler instead (job_generations.py), and forwards each item's generated tokens."""

from __future__ import annotations

from typing import Any

import numpy as np

from fmserve.core import tensors
from fmserve.queue.stage_worker import stage_resources
from fmserve.v1 import common_pb2, jobs_pb2
from services.inference.codec import job
from services.inference.codec.infer import sequences_of
from services.inference.instance import BACKGROUND_PRIORITY, InferRequest
from services.inference.job_generations import JobGenerations
from services.inference.registry import ModelRegistry
from services.inference.settings import InferenceSettings


def worker_resources(settings: InferenceSettings, registry: ModelRegistry) -> list[Any]:
    generations = JobGenerations(registry, settings.job_max_sequences)

    async def infer(chunk: jobs_pb2.JobChunk) -> jobs_pb2.JobChunk:
        if chunk.route.task == common_pb2.TASK_TEXT_GENERATION:
            return await generate(chunk)
        route = chunk.route
        sequences, layout = sequences_of(_inputs(chunk))
        instance = await registry.instance(route.model, route.version)
        request = InferRequest(
            route.model, route.version, sequences, layout, priority=BACKGROUND_PRIORITY
        )
        output = await instance.infer(request)
        out = _forwarded(chunk)
        out.output.CopyFrom(tensors.to_wire(np.asarray(output.array, dtype=np.float32)))
        if output.frames is not None:  # a per-frame task: postprocess cuts each clip's rows
            out.lengths.CopyFrom(tensors.to_wire(output.frames))
        return out

    async def generate(chunk: jobs_pb2.JobChunk) -> jobs_pb2.JobChunk:
        route = chunk.route
        done = await generations.run(route.model, route.version, job.requests_to_domain(chunk))
        out = _forwarded(chunk)
        out.generations.extend(job.generation_to_wire(g.token_ids, g.finished) for g in done)
        return out

    return stage_resources("inference", settings, infer, None)


def _inputs(chunk: jobs_pb2.JobChunk) -> dict[str, np.ndarray]:
    """The model's inputs: a media chunk's featurized tensors, or a text chunk's ragged ids."""
    wire = (
        dict(chunk.inputs)
        if chunk.media
        else {"input_ids": chunk.input_ids, "lengths": chunk.lengths}
    )
    return {name: tensors.to_domain(tensor, name) for name, tensor in wire.items()}


def _forwarded(chunk: jobs_pb2.JobChunk) -> jobs_pb2.JobChunk:
    """The chunk as postprocess gets it: a text chunk's lengths and offsets kept, the model's
    inputs (ids, featurized media) dropped."""
    out = jobs_pb2.JobChunk()
    out.CopyFrom(chunk)
    out.ClearField("input_ids")
    out.ClearField("inputs")
    return out
