"""The gateway's generation rules: sampling checks at the edge, cache keys that cover every
parameter, and the conversions of the inference stream (the KServe v2 generation contract)."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from fmserve.core.repository import ModelRepository
from fmserve.core.tasks import TaskName
from fmserve.errors import FmserveError, InvalidInput, NotFound, Overloaded
from services.gateway.cache_keys import generation_key
from services.gateway.routes import Route
from services.gateway.sampling import Prompt, Sampling, StopLimits, check_prompt_size, checked
from services.gateway.streams import in_stream_error, infer_request, step_to_domain

LIMITS = StopLimits(max_stop_strings=4, max_stop_chars=8)
ROUTE = Route("tiny-llama", "1", TaskName.TEXT_GENERATION)


@pytest.fixture(scope="module")
def config(model_repository: Path):
    return ModelRepository(model_repository).get("tiny-llama")


def test_defaults_pass_and_max_new_tokens_takes_the_models_default(config):
    assert checked(Sampling(), config, LIMITS).max_new_tokens == 16
    assert checked(Sampling(max_new_tokens=128), config, LIMITS).max_new_tokens == 128


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        (Sampling(max_new_tokens=0), r"max_new_tokens must be 1 to 128 .*got 0"),
        (Sampling(max_new_tokens=-3), r"max_new_tokens must be 1 to 128 .*got -3"),
        (Sampling(max_new_tokens=129), r"max_new_tokens must be 1 to 128 .*got 129"),
        (Sampling(temperature=-1), r"temperature must be >= 0, got -1"),
        (Sampling(top_p=0), r"top_p must be in \(0, 1\], got 0"),
        (Sampling(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (Sampling(top_k=-1), r"top_k must be 0 .*got -1"),
        (Sampling(repetition_penalty=0), r"repetition_penalty must be > 0"),
        (Sampling(stop=("a", "b", "c", "d", "e")), r"stop has 5 strings; the limit is 4"),
        (Sampling(stop=("a", "")), r"stop\[1\] is empty"),
        (Sampling(stop=("123456789",)), r"stop\[0\] has 9 characters; the limit is 8"),
        (Sampling(stop_token_ids=(3, -1)), r"stop_token_ids\[1\] is -1"),
    ],
)
def test_bad_parameters_are_refused_naming_the_field(config, sampling, message):
    with pytest.raises(InvalidInput, match=f"^{message}"):
        checked(sampling, config, LIMITS)


def test_prompts_over_the_gateways_size_limit_are_refused_naming_the_field():
    check_prompt_size(Prompt("x" * 10), max_chars=10)
    with pytest.raises(InvalidInput, match=r"^prompt has 11 characters; the limit is 10"):
        check_prompt_size(Prompt("x" * 11), max_chars=10)
    with pytest.raises(InvalidInput, match=r"^messages has 11 characters; the limit is 10"):
        check_prompt_size(Prompt(messages=(("user", "x" * 7),)), max_chars=10)


def test_only_greedy_or_seeded_requests_are_deterministic():
    assert Sampling().deterministic
    assert Sampling(temperature=0.7, seed=3).deterministic
    assert not Sampling(temperature=0.7).deterministic


VARIANTS = {
    "max_new_tokens": 17,
    "temperature": 0.5,
    "top_p": 0.9,
    "top_k": 5,
    "seed": 7,
    "repetition_penalty": 1.1,
    "stop": ("\n",),
    "stop_token_ids": (2,),
}


def test_the_cache_key_changes_with_every_sampling_parameter():
    base = Sampling(max_new_tokens=16)
    assert set(VARIANTS) == {f.name for f in fields(Sampling)}  # a new parameter needs a case
    prompt = Prompt("hello")
    keys = {generation_key(ROUTE, prompt, replace(base, **{k: v})) for k, v in VARIANTS.items()}
    keys.add(generation_key(ROUTE, prompt, base))
    assert len(keys) == len(VARIANTS) + 1


def test_the_cache_key_changes_with_the_prompt_messages_and_version():
    base = Sampling(max_new_tokens=16)
    prompts = [
        Prompt("hello"),
        Prompt("hello "),
        Prompt(messages=(("user", "hello"),)),
        Prompt(messages=(("system", "hello"),)),
        Prompt(messages=(("user", "hel"), ("user", "lo"))),
    ]
    keys = {generation_key(ROUTE, p, base) for p in prompts}
    keys.add(generation_key(replace(ROUTE, version="2"), prompts[0], base))
    assert len(keys) == len(prompts) + 1
    assert generation_key(ROUTE, Prompt("hello"), base) == generation_key(
        ROUTE, Prompt("hello"), Sampling(max_new_tokens=16)
    )
    assert "hello" not in generation_key(ROUTE, prompts[0], base)  # hashed


def test_the_infer_request_carries_ids_and_every_parameter():
    sampling = Sampling(16, 0.5, 0.9, 5, 7, 1.1, ("x",), (2, 3))

    request = infer_request(ROUTE, [1, 5, 9], sampling, "req-1")

    assert (request.model_name, request.model_version, request.id) == ("tiny-llama", "1", "req-1")
    assert [(i.name, i.datatype, list(i.shape)) for i in request.inputs] == [
        ("input_ids", "INT64", [1, 3]),
        ("stop_token_ids", "INT64", [2]),
    ]
    assert np.frombuffer(request.raw_input_contents[0], "<i8").tolist() == [1, 5, 9]
    assert np.frombuffer(request.raw_input_contents[1], "<i8").tolist() == [2, 3]
    p = request.parameters
    assert p["max_new_tokens"].int64_param == 16 and p["top_k"].int64_param == 5
    assert p["temperature"].double_param == 0.5 and p["top_p"].double_param == 0.9
    assert p["seed"].int64_param == 7 and p["repetition_penalty"].double_param == 1.1
    assert "seed" not in infer_request(ROUTE, [1], Sampling(), "r").parameters


def _response(ids: list[int] | None, final: bool, raw: bool = True, **params):
    response = service_pb2.ModelInferResponse(model_name="tiny-llama", id="r")
    if ids is not None:
        output = response.outputs.add(name="token_ids", datatype="INT64", shape=[1, len(ids)])
        if raw:
            response.raw_output_contents.append(np.asarray(ids, "<i8").tobytes())
        else:
            output.contents.int64_contents.extend(ids)
    response.parameters["triton_final_response"].bool_param = final
    for name, value in params.items():
        if isinstance(value, str):
            response.parameters[name].string_param = value
        else:
            response.parameters[name].int64_param = value
    return service_pb2.ModelStreamInferResponse(infer_response=response)


def test_steps_read_tokens_raw_or_as_contents():
    assert step_to_domain(_response([7], False)).token_ids == [7]
    assert step_to_domain(_response([7, 8], False, raw=False)).token_ids == [7, 8]
    assert not step_to_domain(_response([7], False)).final


def test_the_final_step_carries_the_finish_reason_and_usage_with_or_without_tokens():
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "cached_tokens": 2}
    step = step_to_domain(_response(None, True, finish_reason="length", **usage))

    assert step.final and step.token_ids == [] and step.finish_reason == "length"
    assert step.usage is not None
    assert (step.usage.prompt_tokens, step.usage.completion_tokens) == (5, 3)
    assert step.usage.cached_tokens == 2
    assert step_to_domain(_response([2], True, finish_reason="stop")).token_ids == [2]


@pytest.mark.parametrize(
    ("message", "error", "text"),
    [
        ("INVALID_ARGUMENT: temperature must be >= 0, got -1", InvalidInput, "temperature must"),
        ("RESOURCE_EXHAUSTED: no room for 300 tokens", Overloaded, "no room for 300 tokens"),
        ("NOT_FOUND: model 'x' has no version 9", NotFound, "model 'x' has no version 9"),
        ("INTERNAL: at /srv/engine/x.py line 3", FmserveError, "the inference stage failed"),
        ("something odd", FmserveError, "the inference stage failed"),
    ],
)
def test_in_stream_errors_keep_their_status(message, error, text):
    with pytest.raises(error) as raised:
        step_to_domain(service_pb2.ModelStreamInferResponse(error_message=message))
    assert type(raised.value) is error
    assert raised.value.message.startswith(text)
    assert in_stream_error(message).code == error.code
