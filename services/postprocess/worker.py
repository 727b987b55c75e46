"""The postprocess stage of the asynchronous path, the last one: turns each queued chunk's model
outputs into results, which the stage worker records in the cache service before it acks; a
text-generation job's generated tokens become their text (stop strings applied) here.
This service also consumes the dead-letter queue (fmserve.queue.dead_letters.DeadLetters)."""

from __future__ import annotations

from typing import Any

from fmserve.queue.stage_worker import stage_resources
from fmserve.v1 import common_pb2, jobs_pb2
from services.postprocess.codec import chunk_to_domain, generation_to_wire, to_wire
from services.postprocess.detokenizers import Detokenizers
from services.postprocess.generations import detokenize
from services.postprocess.postprocessor import Postprocessor
from services.postprocess.settings import PostprocessSettings


def worker_resources(
    settings: PostprocessSettings, postprocessor: Postprocessor, detokenizers: Detokenizers
) -> list[Any]:
    async def postprocess(chunk: jobs_pb2.JobChunk) -> list[common_pb2.Result]:
        if chunk.route.task == common_pb2.TASK_TEXT_GENERATION:
            return await finish(chunk)
        results = await postprocessor.run(chunk_to_domain(chunk))
        return [to_wire(result) for result in results]

    async def finish(chunk: jobs_pb2.JobChunk) -> list[common_pb2.Result]:
        route, results = chunk.route, []
        for generated in chunk.generations:
            detokenizer = await detokenizers.open(route.model, route.version, route.parameters.stop)
            results.append(
                generation_to_wire(generated, detokenize(detokenizer, generated.token_ids))
            )
        return results

    return stage_resources("postprocess", settings, postprocess, None, dead_letters=True)
