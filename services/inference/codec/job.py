"""A text-generation job's chunk (jobs.proto's JobChunk) ↔ the generation domain: the route's
sampling parameters and each item's prompt ids in, each item's generation (token ids, finish
reason, usage; postprocess adds the text) out."""

from __future__ import annotations

from fmserve.core import tensors
from fmserve.v1 import common_pb2, jobs_pb2
from services.inference.generation.params import GenerationRequest, Sampling
from services.inference.generation.scheduler import Finished
from services.inference.ragged import split_ragged


def requests_to_domain(chunk: jobs_pb2.JobChunk) -> list[GenerationRequest]:
    """One generation per item, all with the job's parameters (the gateway checked them and
    resolved max_new_tokens; unset fields take common.proto's defaults all the same)."""
    ids = tensors.to_domain(chunk.input_ids, "input_ids")
    lengths = tensors.to_domain(chunk.lengths, "lengths")
    prompts, _ = split_ragged(ids, lengths)
    p = chunk.route.parameters
    sampling = Sampling(
        temperature=p.temperature,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        seed=p.seed if p.HasField("seed") else None,
    )
    max_new = p.max_new_tokens if p.HasField("max_new_tokens") else None
    stop_ids = frozenset(p.stop_token_ids)
    return [
        GenerationRequest(tuple(int(i) for i in prompt), max_new, sampling, stop_ids)
        for prompt in prompts
    ]


def generation_to_wire(token_ids: list[int], finished: Finished) -> common_pb2.Generation:
    usage = common_pb2.Usage(
        prompt_tokens=finished.prompt_tokens,
        completion_tokens=finished.completion_tokens,
        cached_tokens=finished.cached_tokens,
    )
    return common_pb2.Generation(token_ids=token_ids, finish_reason=finished.reason, usage=usage)
