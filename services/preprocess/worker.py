"""The preprocess stage of the asynchronous path: tokenizes each queued chunk of a job's texts
(a text-generation job's texts are prompts, encoded as EncodePrompt encodes them) and forwards
it to the inference queue (fmserve.queue.stage_worker.StageWorker owns acks, retries and
per-item failures; this module only does the stage's work)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fmserve.core import tensors
from fmserve.core.tasks import TASK_FROM_WIRE
from fmserve.queue.chunks import singles
from fmserve.queue.stage_worker import stage_resources
from fmserve.v1 import common_pb2, jobs_pb2
from services.preprocess.prompts import PromptRequest
from services.preprocess.settings import PreprocessSettings
from services.preprocess.tokenizers import TextName, Tokenizers, alone, in_request


def worker_resources(settings: PreprocessSettings, tokenizers: Tokenizers) -> list[Any]:
    async def tokenize(chunk: jobs_pb2.JobChunk) -> jobs_pb2.JobChunk:
        if chunk.route.task == common_pb2.TASK_TEXT_GENERATION:
            return await encode_prompts(chunk)
        route = chunk.route
        task = TASK_FROM_WIRE.get(route.task)
        tokenized = await tokenizers.tokenize(
            route.model,
            route.version,
            list(chunk.texts),
            truncate=route.truncate,
            offsets=task is not None and task.needs_offsets,
            name=text_name(chunk),
        )
        out = jobs_pb2.JobChunk()
        out.CopyFrom(chunk)
        out.input_ids.CopyFrom(tensors.to_wire(tokenized.input_ids))
        out.lengths.CopyFrom(tensors.to_wire(tokenized.lengths))
        if tokenized.offsets is not None:
            out.offsets.CopyFrom(tensors.to_wire(tokenized.offsets))
        return out

    async def encode_prompts(chunk: jobs_pb2.JobChunk) -> jobs_pb2.JobChunk:
        """Each text is a prompt, encoded as EncodePrompt encodes it; one whose prompt and
        max_new_tokens overflow the context fails (alone, once the chunk is split)."""
        route = chunk.route
        max_new = route.parameters.max_new_tokens
        prompts = [
            await tokenizers.encode_prompt(
                PromptRequest(route.model, route.version, prompt=text, max_new_tokens=max_new)
            )
            for text in chunk.texts
        ]
        out = jobs_pb2.JobChunk()
        out.CopyFrom(chunk)
        ids = np.asarray([i for prompt in prompts for i in prompt], dtype=np.int64)
        out.input_ids.CopyFrom(tensors.to_wire(ids))
        out.lengths.CopyFrom(tensors.to_wire(np.asarray([len(p) for p in prompts], np.int32)))
        return out

    # Only this stage sees raw texts, so only it retries a failed chunk item by item.
    return stage_resources("preprocess", settings, tokenize, singles)


def text_name(chunk: jobs_pb2.JobChunk) -> TextName:
    """A chunk of one item says "the text": its error becomes that item's answer, where
    "texts[0]" would mean nothing to the job's owner. A chunk of several names texts by position:
    its error is never an answer (the stage worker retries its items one by one)."""
    return alone if len(chunk.texts) == 1 else in_request
