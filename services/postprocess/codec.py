"""The postprocess service's wire ↔ domain conversions, named for their direction as in every
service; used by the servicer and by the queue worker, which builds the same request from a
job chunk."""

from __future__ import annotations

import numpy as np

from fmserve.core import tensors
from fmserve.core.tasks import TASK_FROM_WIRE, TaskName
from fmserve.errors import InvalidInput
from fmserve.v1 import common_pb2, postprocess_pb2
from services.postprocess.postprocessor import ModelOutputs
from services.postprocess.results import Classification, Embedding, Result

# TASK_UNSPECIFIED is accepted: the model's own task applies.
_TASKS: dict[common_pb2.Task, TaskName | None] = {
    common_pb2.TASK_UNSPECIFIED: None,
    **TASK_FROM_WIRE,
}


def to_domain(request: postprocess_pb2.PostprocessRequest) -> ModelOutputs:
    if request.task not in _TASKS:
        known = ", ".join(common_pb2.Task.Name(t) for t in _TASKS)
        raise InvalidInput(f"unknown task {request.task}; use one of {known}")
    if not request.HasField("output"):
        raise InvalidInput("output is required: the inference service's output tensor")
    return ModelOutputs(
        model=request.model,
        version=request.version,
        task=_TASKS[request.task],
        output=tensors.to_domain(request.output, "output"),
        texts=list(request.texts),
        lengths=_optional(request, "lengths"),
        offsets=_optional(request, "offsets"),
        top_k=request.top_k,
    )


def _optional(request: postprocess_pb2.PostprocessRequest, name: str) -> np.ndarray | None:
    return tensors.to_domain(getattr(request, name), name) if request.HasField(name) else None


def to_wire(result: Result) -> common_pb2.Result:
    if isinstance(result, Embedding):
        return common_pb2.Result(embedding=common_pb2.Embedding(values=result.values.tolist()))
    if isinstance(result, Classification):
        labels = [common_pb2.LabelScore(label=s.label, score=s.score) for s in result.labels]
        return common_pb2.Result(classification=common_pb2.Classification(labels=labels))
    entities = [
        common_pb2.Entity(label=e.label, score=e.score, start=e.start, end=e.end, text=e.text)
        for e in result.entities
    ]
    return common_pb2.Result(entities=common_pb2.Entities(entities=entities))
