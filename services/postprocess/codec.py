"""The postprocess service's wire ↔ domain conversions, named for their direction as in every
service: a PostprocessRequest (the servicer) or a queued JobChunk (the worker) to the domain's
ModelOutputs, and a result (or a generation job item's text) to the wire."""

from __future__ import annotations

import numpy as np

from fmserve.core import tensors
from fmserve.core.tasks import TASK_FROM_WIRE, TaskName
from fmserve.errors import InvalidInput
from fmserve.v1 import common_pb2, jobs_pb2, postprocess_pb2
from services.postprocess.generations import Text
from services.postprocess.postprocessor import ModelOutputs
from services.postprocess.results import (
    Classification,
    Embedding,
    Entities,
    Result,
    Transcription,
    VoiceActivity,
)

# TASK_UNSPECIFIED is accepted: the model's own task applies.
_TASKS: dict[common_pb2.Task, TaskName | None] = {
    common_pb2.TASK_UNSPECIFIED: None,
    **TASK_FROM_WIRE,
}
# The wire messages that carry a batch of model outputs, with the same field names.
Outputs = postprocess_pb2.PostprocessRequest | jobs_pb2.JobChunk


def to_domain(request: postprocess_pb2.PostprocessRequest) -> ModelOutputs:
    return ModelOutputs(
        model=request.model,
        version=request.version,
        task=task_to_domain(request.task),
        output=output_to_domain(request),
        texts=list(request.texts),
        lengths=optional_tensor(request, "lengths"),
        offsets=optional_tensor(request, "offsets"),
        top_k=request.top_k,
    )


def chunk_to_domain(chunk: jobs_pb2.JobChunk) -> ModelOutputs:
    """A queued chunk's model outputs. As on the sync path, the texts, token counts and offsets
    go along only for a task whose postprocessing needs them (entities cut out of texts); a
    per-frame audio task's lengths are each clip's frames (set by inference)."""
    route = chunk.route
    task = task_to_domain(route.task)
    tokens = task is not None and task.postprocess_needs_tokens
    frames = task is not None and task.per_frame
    return ModelOutputs(
        model=route.model,
        version=route.version,
        task=task,
        output=output_to_domain(chunk),
        texts=list(chunk.texts) if tokens else [],
        lengths=optional_tensor(chunk, "lengths") if tokens or frames else None,
        offsets=optional_tensor(chunk, "offsets") if tokens else None,
        top_k=route.top_k,
    )


def task_to_domain(task: common_pb2.Task) -> TaskName | None:
    """The task a wire value names; None (TASK_UNSPECIFIED) is the model's own."""
    if task not in _TASKS:
        known = ", ".join(common_pb2.Task.Name(t) for t in _TASKS)
        raise InvalidInput(f"unknown task {task}; use one of {known}")
    return _TASKS[task]


def output_to_domain(message: Outputs) -> np.ndarray:
    if not message.HasField("output"):
        raise InvalidInput("output is required: the inference service's output tensor")
    return tensors.to_domain(message.output, "output")


def optional_tensor(message: Outputs, name: str) -> np.ndarray | None:
    return tensors.to_domain(getattr(message, name), name) if message.HasField(name) else None


def to_wire(result: Result) -> common_pb2.Result:
    if isinstance(result, Embedding):
        return common_pb2.Result(embedding=common_pb2.Embedding(values=result.values.tolist()))
    if isinstance(result, Classification):
        labels = [common_pb2.LabelScore(label=s.label, score=s.score) for s in result.labels]
        return common_pb2.Result(classification=common_pb2.Classification(labels=labels))
    if isinstance(result, Transcription):
        return common_pb2.Result(transcription=transcription_to_wire(result))
    if isinstance(result, VoiceActivity):
        return common_pb2.Result(voice_activity=voice_activity_to_wire(result))
    return common_pb2.Result(entities=entities_to_wire(result))


def entities_to_wire(result: Entities) -> common_pb2.Entities:
    entities = [
        common_pb2.Entity(label=e.label, score=e.score, start=e.start, end=e.end, text=e.text)
        for e in result.entities
    ]
    return common_pb2.Entities(entities=entities)


def transcription_to_wire(result: Transcription) -> common_pb2.Transcription:
    words = [
        common_pb2.WordTiming(word=w.word, start_s=w.start_s, end_s=w.end_s) for w in result.words
    ]
    return common_pb2.Transcription(text=result.text, words=words)


def voice_activity_to_wire(result: VoiceActivity) -> common_pb2.VoiceActivity:
    segments = [common_pb2.SpeechSegment(start_s=s.start_s, end_s=s.end_s) for s in result.segments]
    return common_pb2.VoiceActivity(
        frame_probabilities=result.frame_probabilities.tolist(),
        frame_s=result.frame_s,
        segments=segments,
    )


def generation_to_wire(generated: common_pb2.Generation, text: Text) -> common_pb2.Result:
    """A job item's result: the inference stage's generation with its text; a stop string
    ends it early, as it ends a stream ("stop", the tokens after it dropped)."""
    generation = common_pb2.Generation()
    generation.CopyFrom(generated)
    generation.text = text.text
    if text.stopped:
        del generation.token_ids[text.tokens :]
        generation.finish_reason = "stop"
        generation.usage.completion_tokens = text.tokens
    return common_pb2.Result(generation=generation)
