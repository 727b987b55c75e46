"""The fmserve.v1.Postprocess servicer: wire → Postprocessor → wire."""

from __future__ import annotations

import grpc
import numpy as np

from fmserve.core import tensors
from fmserve.core.tasks import TASK_FROM_WIRE, TaskName
from fmserve.errors import InvalidInput
from fmserve.rpc.service import Servicer
from fmserve.v1 import common_pb2, jobs_pb2, postprocess_pb2, postprocess_pb2_grpc
from services.postprocess.postprocessor import ModelOutputs, Postprocessor
from services.postprocess.results import Classification, Embedding, Result

_TASKS: dict[common_pb2.Task, TaskName | None] = {
    common_pb2.TASK_UNSPECIFIED: None,
    **TASK_FROM_WIRE,
}
# The wire messages that carry a batch of model outputs: the sync path's request, and the
# queue's chunk (worker.py), with the same field names.
Outputs = postprocess_pb2.PostprocessRequest | jobs_pb2.JobChunk


class PostprocessServicer(postprocess_pb2_grpc.PostprocessServicer):
    def __init__(self, postprocessor: Postprocessor) -> None:
        self.postprocessor = postprocessor

    async def Postprocess(
        self, request: postprocess_pb2.PostprocessRequest, context: grpc.aio.ServicerContext
    ) -> postprocess_pb2.PostprocessResponse:
        results = await self.postprocessor.run(to_domain(request))
        return postprocess_pb2.PostprocessResponse(results=[to_wire(r) for r in results])


def servicer(postprocessor: Postprocessor) -> Servicer:
    name = postprocess_pb2.DESCRIPTOR.services_by_name["Postprocess"].full_name
    return Servicer(
        postprocess_pb2_grpc.add_PostprocessServicer_to_server,
        PostprocessServicer(postprocessor),
        name,
    )


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
    entities = [
        common_pb2.Entity(label=e.label, score=e.score, start=e.start, end=e.end, text=e.text)
        for e in result.entities
    ]
    return common_pb2.Result(entities=common_pb2.Entities(entities=entities))
