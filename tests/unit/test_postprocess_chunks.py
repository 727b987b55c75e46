"""The postprocess stage's one converter from a queued chunk to the postprocessor's input: what a
PostprocessRequest would carry, read from the JobChunk directly."""

from __future__ import annotations

import numpy as np
import pytest

from fmserve.core import tensors
from fmserve.core.tasks import TaskName
from fmserve.errors import InvalidInput
from fmserve.v1 import common_pb2, jobs_pb2
from services.postprocess.codec import chunk_to_domain

pytestmark = pytest.mark.timeout(10)

LOGITS = np.zeros((3, 2), dtype=np.float32)


def chunk(task: common_pb2.Task, **fields) -> jobs_pb2.JobChunk:
    route = jobs_pb2.JobRoute(job_id="j", model="m", version="1", task=task, top_k=2)
    return jobs_pb2.JobChunk(route=route, texts=["ab", "c"], **fields)


def test_token_classification_takes_the_texts_lengths_and_offsets() -> None:
    lengths, offsets = np.array([2, 1], dtype=np.int32), np.zeros((3, 2), dtype=np.int32)
    outputs = chunk_to_domain(
        chunk(
            common_pb2.TASK_TOKEN_CLASSIFICATION,
            output=tensors.to_wire(LOGITS),
            lengths=tensors.to_wire(lengths),
            offsets=tensors.to_wire(offsets),
        )
    )
    assert (outputs.model, outputs.version, outputs.top_k) == ("m", "1", 2)
    assert outputs.task is TaskName.TOKEN_CLASSIFICATION and list(outputs.texts) == ["ab", "c"]
    assert outputs.lengths is not None and outputs.lengths.tolist() == [2, 1]
    assert outputs.offsets is not None and outputs.offsets.shape == (3, 2)
    assert np.array_equal(outputs.output, LOGITS)


def test_other_tasks_take_the_output_alone() -> None:
    outputs = chunk_to_domain(chunk(common_pb2.TASK_EMBEDDING, output=tensors.to_wire(LOGITS)))
    assert outputs.task is TaskName.EMBEDDING
    assert (list(outputs.texts), outputs.lengths, outputs.offsets) == ([], None, None)


def test_a_chunk_without_the_models_output_is_refused() -> None:
    with pytest.raises(InvalidInput, match="output is required"):
        chunk_to_domain(chunk(common_pb2.TASK_EMBEDDING))
