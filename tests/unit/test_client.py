"""The Python client (fmserve/client/): twin clients, request building, result conversion.

No server: requests are checked as built, and answers are messages built here by hand.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from fmserve.client import (
    AsyncClient,
    AsyncJob,
    Client,
    Entity,
    Generation,
    GenerationDelta,
    GenerationParams,
    Job,
    LabelScore,
    Usage,
)
from fmserve.client.wire import (
    generate_request,
    generation_params,
    infer_request,
    job_header,
    job_params,
    to_answer,
    to_generation_event,
    to_model_info,
    to_result,
)
from fmserve.v1 import common_pb2, gateway_pb2, jobs_pb2

pytestmark = pytest.mark.timeout(10)


def public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in vars(cls).items()
        if callable(member) and not name.startswith("_")
    }


# --- the twins -------------------------------------------------------------------------------


def test_both_clients_have_the_same_public_methods() -> None:
    assert public_methods(Client).keys() == public_methods(AsyncClient).keys()
    assert {"infer", "embed", "classify", "entities", "models", "close"} <= set(
        public_methods(Client)
    )


def _twin(annotation: object) -> object:
    """The blocking twin's name of an async type (`AsyncJob` → `Job`, `AsyncIterator` →
    `Iterator`): twins return twins."""
    if not isinstance(annotation, str):
        return annotation
    return annotation.replace("AsyncJob", "Job").replace("AsyncIterator", "Iterator")


TWINS = [(Client, AsyncClient), (Job, AsyncJob)]


def test_both_job_handles_have_the_same_public_methods() -> None:
    assert public_methods(Job).keys() == public_methods(AsyncJob).keys()
    assert {"status", "wait", "results", "cancel"} <= set(public_methods(Job))
    assert {"submit", "job", "jobs"} <= set(public_methods(Client))


@pytest.mark.parametrize(
    ("blocking_class", "async_class", "name"),
    [(b, a, name) for b, a in TWINS for name in [*sorted(public_methods(b)), "__init__"]],
)
def test_twins_take_the_same_parameters(blocking_class: type, async_class: type, name: str) -> None:
    blocking = inspect.signature(getattr(blocking_class, name))
    awaited = inspect.signature(getattr(async_class, name))
    if name == "__init__":  # a handle holds its own kind of client
        return
    assert blocking.parameters == awaited.parameters
    assert blocking.return_annotation == _twin(awaited.return_annotation)


def test_every_async_method_is_awaited_and_no_blocking_one_is() -> None:
    for blocking_class, async_class in TWINS:
        for name in public_methods(blocking_class):
            method = getattr(async_class, name)
            # An async generator (AsyncJob.results) is iterated with `async for`, not awaited.
            awaited = inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method)
            assert not inspect.iscoroutinefunction(getattr(blocking_class, name)), name
            assert awaited, name


def test_both_clients_are_context_managers() -> None:
    assert hasattr(Client, "__enter__") and hasattr(Client, "__exit__")
    assert hasattr(AsyncClient, "__aenter__") and hasattr(AsyncClient, "__aexit__")


# --- requests --------------------------------------------------------------------------------


def test_request_carries_every_option() -> None:
    request = infer_request(["a", "b"], "ner", "token-classification", "3", True, 2, "refresh")
    assert list(request.texts) == ["a", "b"]
    assert (request.model, request.version) == ("ner", "3")
    assert request.task == common_pb2.TASK_TOKEN_CLASSIFICATION
    assert request.options.truncate is True
    assert request.options.top_k == 2
    assert request.options.cache_policy == common_pb2.CACHE_POLICY_REFRESH


def test_one_string_is_one_text_and_no_task_is_unspecified() -> None:
    request = infer_request("just one", "m", None, "", False, 0, "use")
    assert list(request.texts) == ["just one"]
    assert request.task == common_pb2.TASK_UNSPECIFIED
    assert request.options.cache_policy == common_pb2.CACHE_POLICY_USE


@pytest.mark.parametrize(
    ("name", "wire"),
    [
        ("embedding", common_pb2.TASK_EMBEDDING),
        ("text-classification", common_pb2.TASK_TEXT_CLASSIFICATION),
        ("token-classification", common_pb2.TASK_TOKEN_CLASSIFICATION),
    ],
)
def test_task_names_map_to_the_wire(name: str, wire: int) -> None:
    assert infer_request("x", "m", name, "", False, 0, "bypass").task == wire


@pytest.mark.parametrize("task", ["classification", "", "EMBEDDING"])
def test_unknown_task_is_refused_naming_the_known_ones(task: str) -> None:
    with pytest.raises(ValueError, match=r"unknown task.*text-classification"):
        infer_request("x", "m", task, "", False, 0, "use")


@pytest.mark.parametrize("cache", ["skip", "", "USE"])
def test_unknown_cache_policy_is_refused_naming_the_known_ones(cache: str) -> None:
    with pytest.raises(ValueError, match=r"unknown cache policy.*bypass"):
        infer_request("x", "m", None, "", False, 0, cache)


def test_blocking_client_refuses_a_bad_request_before_calling() -> None:
    with Client("127.0.0.1:9", timeout=1.0) as client, pytest.raises(ValueError):
        client.infer("x", "m", cache="sometimes")


async def test_async_client_refuses_a_bad_request_before_calling() -> None:
    async with AsyncClient("127.0.0.1:9", timeout=1.0) as client:
        with pytest.raises(ValueError):
            await client.infer("x", "m", task="translation")


# --- answers ---------------------------------------------------------------------------------


def embedding(values: list[float], cached: bool = False) -> common_pb2.Result:
    return common_pb2.Result(embedding=common_pb2.Embedding(values=values), cached=cached)


def test_embedding_result_is_a_float32_vector() -> None:
    vector = to_result(embedding([0.6, 0.8]))
    assert isinstance(vector, np.ndarray)
    assert vector.dtype == np.float32
    np.testing.assert_allclose(vector, [0.6, 0.8])


def test_classification_result_keeps_the_order_of_labels() -> None:
    result = common_pb2.Result(
        classification=common_pb2.Classification(
            labels=[
                common_pb2.LabelScore(label="pos", score=0.75),
                common_pb2.LabelScore(label="neg", score=0.25),
            ]
        )
    )
    assert to_result(result) == [LabelScore("pos", 0.75), LabelScore("neg", 0.25)]


def test_entities_result_keeps_offsets_and_text() -> None:
    result = common_pb2.Result(
        entities=common_pb2.Entities(
            entities=[
                common_pb2.Entity(label="PER", score=0.5, start=0, end=3, text="Ada"),
                common_pb2.Entity(label="LOC", score=0.25, start=7, end=13, text="London"),
            ]
        )
    )
    assert to_result(result) == [
        Entity("PER", 0.5, 0, 3, "Ada"),
        Entity("LOC", 0.25, 7, 13, "London"),
    ]


def test_answer_converts_every_result_and_its_cache_flag() -> None:
    reply = gateway_pb2.InferResponse(
        model="minilm-embed",
        version="1",
        task=common_pb2.TASK_EMBEDDING,
        results=[embedding([1.0, 0.0], cached=True), embedding([0.0, 1.0])],
    )
    answer = to_answer(reply)
    assert (answer.model, answer.version, answer.task) == ("minilm-embed", "1", "embedding")
    np.testing.assert_allclose(np.stack(answer.results), [[1.0, 0.0], [0.0, 1.0]])
    assert answer.cached == [True, False]
    assert answer.cache_hit is False


def test_cache_hit_means_every_result_came_from_the_cache() -> None:
    reply = gateway_pb2.InferResponse(task=common_pb2.TASK_EMBEDDING, results=[embedding([1.0])])
    assert to_answer(reply).cache_hit is False
    reply.results[0].cached = True
    assert to_answer(reply).cache_hit is True
    assert to_answer(gateway_pb2.InferResponse()).cache_hit is False


def test_answer_without_a_task_says_unspecified() -> None:
    assert to_answer(gateway_pb2.InferResponse()).task == "unspecified"


def test_model_info_conversion() -> None:
    info = gateway_pb2.ModelInfo(
        name="ner",
        task=common_pb2.TASK_TOKEN_CLASSIFICATION,
        versions=["3", "2"],
        max_length=128,
        labels=["O", "PER"],
        dimensions=64,
        description="people",
    )
    model = to_model_info(info)
    assert (model.name, model.task, model.versions) == ("ner", "token-classification", ["3", "2"])
    assert (model.max_length, model.labels, model.dimensions) == (128, ["O", "PER"], 64)
    assert model.description == "people"


# --- generation ------------------------------------------------------------------------------


def test_generate_request_carries_every_parameter() -> None:
    params = GenerationParams(32, 0.7, 0.9, 40, 11, "\n\n", 1.2, (2,))
    request = generate_request(
        None, [{"role": "user", "content": "hi"}], "smollm2", "2", params, "bypass"
    )

    assert (request.model, request.version, request.prompt) == ("smollm2", "2", "")
    assert [(m.role, m.content) for m in request.messages] == [("user", "hi")]
    p = request.parameters
    assert (p.max_new_tokens, p.temperature, p.top_k, p.seed) == (32, 0.7, 40, 11)
    assert p.top_p == pytest.approx(0.9) and p.repetition_penalty == pytest.approx(1.2)
    assert list(p.stop) == ["\n\n"] and list(p.stop_token_ids) == [2]
    assert request.cache_policy == common_pb2.CACHE_POLICY_BYPASS


def test_generate_request_leaves_unset_what_takes_the_default() -> None:
    request = generate_request("Once upon", None, "smollm2", params=GenerationParams(None))

    assert request.prompt == "Once upon" and not request.messages
    assert not request.parameters.HasField("max_new_tokens")
    assert not request.parameters.HasField("seed")
    assert request.parameters.HasField("top_p")  # sent as given: the gateway checks it


def test_stream_events_become_deltas_then_the_generation() -> None:
    delta = gateway_pb2.GenerateResponse(
        delta=gateway_pb2.GenerationDelta(text=" wor", token_ids=[5, 6])
    )
    generation = common_pb2.Generation(
        text="Hello wor",
        token_ids=[4, 5, 6],
        finish_reason="length",
        usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=3, cached_tokens=1),
    )
    result = gateway_pb2.GenerationResult(
        model="m", version="1", generation=generation, cached=True, trace_id="ab"
    )

    assert to_generation_event(delta) == GenerationDelta(" wor", [5, 6])
    assert to_generation_event(gateway_pb2.GenerateResponse(result=result)) == Generation(
        text="Hello wor",
        finish_reason="length",
        usage=Usage(3, 3, 1),
        token_ids=[4, 5, 6],
        cached=True,
        model="m",
        version="1",
        trace_id="ab",
    )


def test_a_bad_cache_policy_is_refused_before_sending() -> None:
    with pytest.raises(ValueError, match="unknown cache policy"):
        generate_request("x", None, "m", cache="sometimes")


def test_sampling_keywords_override_the_params_they_are_given_with() -> None:
    base = GenerationParams(max_new_tokens=8, seed=3)
    assert generation_params(base, {"temperature": 0.5}) == GenerationParams(8, 0.5, seed=3)
    assert generation_params(None, {}) == GenerationParams()
    with pytest.raises(TypeError, match="temprature"):
        generation_params(None, {"temprature": 0.5})


# --- generation jobs -------------------------------------------------------------------------


def test_a_generation_job_header_carries_its_sampling_and_no_label_top_k() -> None:
    params = job_params("generate", 5, None, {"max_new_tokens": 12, "stop": "."})
    header = job_header("smollm2", "generate", "", False, 5, "", "normal", 0, 0, params).header

    assert header.task == common_pb2.TASK_TEXT_GENERATION
    assert header.options.top_k == 0  # top_k is the sampling's in a generation job
    p = header.parameters
    assert (p.max_new_tokens, p.top_k, list(p.stop)) == (12, 5, ["."])


def test_params_given_whole_keep_their_top_k_when_submit_takes_the_default() -> None:
    params = job_params("text-generation", 0, GenerationParams(top_k=40), {})
    assert params == GenerationParams(top_k=40)


def test_other_jobs_take_no_sampling_parameters() -> None:
    assert job_params("embedding", 3, None, {}) is None
    header = job_header("m", "text-classification", "", False, 3, "", "high", 0, 0).header
    assert not header.HasField("parameters") and header.options.top_k == 3
    assert header.priority == jobs_pb2.JOB_PRIORITY_HIGH
    with pytest.raises(ValueError, match="text-generation jobs"):
        job_params(None, 0, None, {"temperature": 1.0})


def test_a_generation_result_becomes_a_generation() -> None:
    generation = common_pb2.Generation(
        text="hi",
        token_ids=[7, 2],
        finish_reason="stop",
        usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=2, cached_tokens=1),
    )
    assert to_result(common_pb2.Result(generation=generation)) == Generation(
        "hi", "stop", Usage(3, 2, 1), [7, 2]
    )
