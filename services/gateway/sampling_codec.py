"""Sampling parameters on the wire (common.proto's SamplingParameters) ↔ the domain's
`Sampling`, both ways: Generate and SubmitJob bring them in, and a generation job's route carries
them, checked, to the stages."""

from __future__ import annotations

from fmserve.v1 import common_pb2
from services.gateway.sampling import Sampling


def to_domain(p: common_pb2.SamplingParameters) -> Sampling:
    """Unset optional fields take the defaults common.proto documents."""
    return Sampling(
        max_new_tokens=p.max_new_tokens if p.HasField("max_new_tokens") else None,
        temperature=p.temperature,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        stop=tuple(p.stop),
        stop_token_ids=tuple(p.stop_token_ids),
    )


def to_wire(sampling: Sampling) -> common_pb2.SamplingParameters:
    return common_pb2.SamplingParameters(
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        seed=sampling.seed,
        repetition_penalty=sampling.repetition_penalty,
        stop=sampling.stop,
        stop_token_ids=sampling.stop_token_ids,
    )
