"""The postprocess stage of the asynchronous path, the last one: turns each queued chunk's model
outputs into results, which the stage worker records in the cache service before it acks.
This service also consumes the dead-letter queue (fmserve.queue.dead_letters.DeadLetters)."""

from __future__ import annotations

from typing import Any

from fmserve.queue.stage_worker import stage_resources
from fmserve.v1 import common_pb2, jobs_pb2
from services.postprocess.codec import chunk_to_domain, to_wire
from services.postprocess.postprocessor import Postprocessor
from services.postprocess.settings import PostprocessSettings


def worker_resources(settings: PostprocessSettings, postprocessor: Postprocessor) -> list[Any]:
    async def postprocess(chunk: jobs_pb2.JobChunk) -> list[common_pb2.Result]:
        results = await postprocessor.run(chunk_to_domain(chunk))
        return [to_wire(result) for result in results]

    return stage_resources("postprocess", settings, postprocess, None, dead_letters=True)
