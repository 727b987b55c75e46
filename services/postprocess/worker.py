"""The postprocess stage of the asynchronous path, the last one: turns each queued chunk's model
outputs into results, which the stage worker records in the cache service before it acks.
This service also consumes the dead-letter queue (fmserve.queue.dead_letters.DeadLetters)."""

from __future__ import annotations

from typing import Any

from fmserve.queue.stage_worker import stage_resources
from fmserve.v1 import common_pb2, jobs_pb2
from services.postprocess.postprocessor import ModelOutputs, Postprocessor
from services.postprocess.server import optional_tensor, output_to_domain, task_to_domain, to_wire
from services.postprocess.settings import PostprocessSettings


def worker_resources(settings: PostprocessSettings, postprocessor: Postprocessor) -> list[Any]:
    async def postprocess(chunk: jobs_pb2.JobChunk) -> list[common_pb2.Result]:
        results = await postprocessor.run(chunk_to_domain(chunk))
        return [to_wire(result) for result in results]

    return stage_resources("postprocess", settings, postprocess, None, dead_letters=True)


def chunk_to_domain(chunk: jobs_pb2.JobChunk) -> ModelOutputs:
    """A chunk's model outputs as the postprocessor takes them. As on the sync path, the
    texts, token counts and offsets go along only for token classification, which cuts
    entities out of the texts."""
    route = chunk.route
    tokens = route.task == common_pb2.TASK_TOKEN_CLASSIFICATION
    return ModelOutputs(
        model=route.model,
        version=route.version,
        task=task_to_domain(route.task),
        output=output_to_domain(chunk),
        texts=list(chunk.texts) if tokens else [],
        lengths=optional_tensor(chunk, "lengths") if tokens else None,
        offsets=optional_tensor(chunk, "offsets") if tokens else None,
        top_k=route.top_k,
    )
