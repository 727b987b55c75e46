"""A text-generation job's chunk in the inference stage (services/inference/codec/job.py):
each item's prompt ids with the job's sampling parameters in, its generation out."""

from __future__ import annotations

import numpy as np
import pytest

from fmserve.core import tensors
from fmserve.v1 import common_pb2, jobs_pb2
from services.inference.codec.job import generation_to_wire, requests_to_domain
from services.inference.generation.params import GenerationRequest, Sampling
from services.inference.generation.scheduler import Finished

pytestmark = pytest.mark.timeout(10)


def chunk(parameters: common_pb2.SamplingParameters) -> jobs_pb2.JobChunk:
    return jobs_pb2.JobChunk(
        route=jobs_pb2.JobRoute(job_id="j", model="m", parameters=parameters),
        indexes=[0, 1],
        input_ids=tensors.to_wire(np.asarray([5, 6, 7, 8, 9], dtype=np.int64)),
        lengths=tensors.to_wire(np.asarray([3, 2], dtype=np.int32)),
    )


def test_every_item_gets_its_prompt_and_the_jobs_parameters():
    parameters = common_pb2.SamplingParameters(
        max_new_tokens=12,
        temperature=0.7,
        top_p=0.9,
        top_k=4,
        seed=3,
        repetition_penalty=1.1,
        stop_token_ids=[2],
    )

    requests = requests_to_domain(chunk(parameters))

    sampling = Sampling(0.7, 0.9, 4, 1.1, seed=3)
    assert requests == [
        GenerationRequest((5, 6, 7), 12, sampling, frozenset({2})),
        GenerationRequest((8, 9), 12, sampling, frozenset({2})),
    ]


def test_unset_parameters_take_the_defaults():
    [request, _] = requests_to_domain(chunk(common_pb2.SamplingParameters()))

    assert request.max_new_tokens is None and request.sampling == Sampling()


def test_a_generation_carries_its_tokens_finish_and_usage():
    g = generation_to_wire([4, 2], Finished("stop", 3, 2, cached_tokens=1))

    assert (list(g.token_ids), g.finish_reason, g.text) == ([4, 2], "stop", "")
    assert (g.usage.prompt_tokens, g.usage.completion_tokens, g.usage.cached_tokens) == (3, 2, 1)
