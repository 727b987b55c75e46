"""The preprocess stage of the asynchronous path: tokenizes each queued chunk of a job's texts
(a text-generation job's texts are prompts, encoded as EncodePrompt encodes them), or
featurizes a media job's chunk as Featurize does, and forwards it to the inference queue
(fmserve.queue.stage_worker.StageWorker owns acks, retries and per-item failures; this module
only does the stage's work)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fmserve.core import tensors
from fmserve.core.tasks import TASK_FROM_WIRE
from fmserve.errors import InvalidInput
from fmserve.queue.chunks import singles
from fmserve.queue.stage_worker import stage_resources
from fmserve.v1 import common_pb2, jobs_pb2
from services.preprocess import codec
from services.preprocess.featurizers import Featurizers
from services.preprocess.media import in_request as in_media_request
from services.preprocess.prompts import PromptRequest
from services.preprocess.settings import PreprocessSettings
from services.preprocess.tokenizers import TextName, Tokenizers, alone, in_request


def worker_resources(
    settings: PreprocessSettings, tokenizers: Tokenizers, featurizers: Featurizers
) -> list[Any]:
    async def tokenize(chunk: jobs_pb2.JobChunk) -> jobs_pb2.JobChunk:
        if chunk.route.task == common_pb2.TASK_TEXT_GENERATION:
            return await encode_prompts(chunk)
        if chunk.media:
            return await featurize(chunk)
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

    async def featurize(chunk: jobs_pb2.JobChunk) -> jobs_pb2.JobChunk:
        """A media chunk's inputs, as Featurize makes them; a bad item fails the chunk, whose
        items are then featurized one by one (so it fails alone)."""
        items = [codec.media_to_domain(m) for m in chunk.media]
        try:
            inputs = await featurizers.featurize(chunk.route.model, chunk.route.version, items)
        except InvalidInput as exc:
            if len(items) > 1:
                raise
            raise media_alone(exc) from None
        out = jobs_pb2.JobChunk()
        out.CopyFrom(chunk)
        for name, array in inputs.items():
            out.inputs[name].CopyFrom(tensors.to_wire(array))
        return out

    # Only this stage sees raw items (texts, media), so only it retries a failed chunk item by
    # item.
    return stage_resources("preprocess", settings, tokenize, singles)


def text_name(chunk: jobs_pb2.JobChunk) -> TextName:
    """A chunk of one item says "the text": its error becomes that item's answer, where
    "texts[0]" would mean nothing to the job's owner. A chunk of several names texts by position:
    its error is never an answer (the stage worker retries its items one by one)."""
    return alone if len(chunk.texts) == 1 else in_request


def media_alone(error: InvalidInput) -> InvalidInput:
    """A chunk of one media item: its error, the item's answer, says "the media item", where
    Featurize's "media[0]" would mean nothing to the job's owner."""
    first = in_media_request(0)
    if not error.message.startswith(first):
        return error
    return type(error)("the media item" + error.message.removeprefix(first))
