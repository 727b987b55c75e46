"""Text generation's pure parts (services/inference/generation/): sampling against transformers'
own logits processors, stopping, the KV budget, parameter checks, the left-padded batch, and
the ModelStreamInfer codec."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from tritonclient.grpc import service_pb2

from fmserve.core.repository import Generation, ModelConfig
from fmserve.core.tasks import TaskName
from fmserve.errors import InputTooLong, InvalidInput, Overloaded
from services.inference.codec import stream as codec
from services.inference.generation.batch import DecodeBatch, layers_of
from services.inference.generation.budget import KvBudget
from services.inference.generation.params import GenerationRequest, Sampling, check
from services.inference.generation.prefix import PrefixCache
from services.inference.generation.sampling import (
    generator,
    keep_top_k,
    keep_top_p,
    next_token,
    penalize_repetition,
)
from services.inference.generation.scheduler import Finished, Tokens
from services.inference.generation.stopping import LENGTH, STOP, finish_reason

pytestmark = pytest.mark.timeout(10)

VOCAB = 50


def logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


# --- sampling ----------------------------------------------------------------------------------


def test_greedy_takes_the_most_likely_token_whatever_the_other_settings() -> None:
    scores = logits()
    greedy = Sampling(top_k=3, top_p=0.5)  # temperature 0: the filters do not apply
    assert next_token(scores, greedy, torch.zeros(0, dtype=torch.long), None) == scores.argmax()


@pytest.mark.parametrize("penalty", [0.7, 1.3])
def test_repetition_penalty_is_transformers_own(penalty: float) -> None:
    scores, seen = logits(1), torch.tensor([3, 7, 7, 11])
    expected = RepetitionPenaltyLogitsProcessor(penalty)(seen[None], scores[None].clone())[0]
    assert torch.equal(penalize_repetition(scores, seen, penalty), expected)


def test_top_k_and_top_p_filter_as_transformers_does() -> None:
    scores = logits(2)
    expected_k = TopKLogitsWarper(5)(None, scores[None].clone())[0]  # type: ignore[arg-type]
    assert torch.equal(keep_top_k(scores, 5), expected_k)
    expected_p = TopPLogitsWarper(0.8)(None, scores[None].clone())[0]  # type: ignore[arg-type]
    assert torch.equal(keep_top_p(scores, 0.8), expected_p)
    assert torch.isfinite(keep_top_p(scores, 1e-9)).sum() == 1  # the best token always stays


def test_sampling_follows_transformers_order_and_its_seed_reproduces() -> None:
    scores, seen = logits(3), torch.tensor([1, 2])
    sampling = Sampling(temperature=0.7, top_k=10, top_p=0.9, repetition_penalty=1.2, seed=42)
    processed = RepetitionPenaltyLogitsProcessor(1.2)(seen[None], scores[None].clone())
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.9)):
        processed = warper(None, processed)  # type: ignore[arg-type]
    probs = torch.softmax(processed[0], -1)
    reference = torch.Generator().manual_seed(42)
    expected = [int(torch.multinomial(probs, 1, generator=reference)) for _ in range(20)]
    rng = generator(sampling)
    assert [next_token(scores, sampling, seen, rng) for _ in range(20)] == expected
    assert len(set(expected)) > 1  # it really samples


def test_greedy_needs_no_generator_and_unseeded_ones_differ() -> None:
    assert generator(Sampling()) is None
    a, b = generator(Sampling(temperature=1.0)), generator(Sampling(temperature=1.0))
    assert a is not None and b is not None and a.initial_seed() != b.initial_seed()


# --- stopping ----------------------------------------------------------------------------------


def test_finish_reasons() -> None:
    stop = frozenset({2, 9})
    assert finish_reason(5, 1, 10, 20, 100, stop) is None
    assert finish_reason(9, 1, 10, 20, 100, stop) == STOP
    assert finish_reason(5, 10, 10, 20, 100, stop) == LENGTH
    assert finish_reason(5, 3, 10, 100, 100, stop) == LENGTH  # the context is full
    assert finish_reason(2, 10, 10, 20, 100, stop) == STOP  # EOS as the last allowed token


# --- budget ------------------------------------------------------------------------------------


def test_the_budget_counts_tokens_and_sequences() -> None:
    budget = KvBudget(max_tokens=100, max_sequences=2)
    assert budget.fits(100)
    budget.take(60)
    assert not budget.fits(41) and budget.fits(40)
    budget.take(10)
    assert not budget.fits(1)  # two sequences already
    budget.give_back(60)
    assert budget.fits(90) and budget.tokens == 10 and budget.sequences == 1
    with pytest.raises(Overloaded, match="max_batch_tokens"):
        budget.check_possible(101)


# --- parameters --------------------------------------------------------------------------------


def config(context: int = 64) -> ModelConfig:
    return ModelConfig(
        name="lm",
        task=TaskName.TEXT_GENERATION,
        versions={"1": Path("/nowhere")},
        max_length=context,
        generation=Generation(max_new_tokens=32, default_max_new_tokens=8),
    )


def test_defaults_come_from_the_model() -> None:
    checked = check(GenerationRequest(prompt_ids=(1, 2, 3)), config(), VOCAB)
    assert checked.max_new_tokens == 8 and checked.reserved_tokens == 11
    assert checked.sampling.greedy


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"sampling": Sampling(temperature=-1)}, "temperature"),
        ({"sampling": Sampling(top_p=0.0)}, "top_p"),
        ({"sampling": Sampling(top_p=1.5)}, "top_p"),
        ({"sampling": Sampling(top_k=-1)}, "top_k"),
        ({"sampling": Sampling(repetition_penalty=0.0)}, "repetition_penalty"),
        ({"sampling": Sampling(temperature=float("nan"))}, "temperature"),
        ({"sampling": Sampling(seed=-3)}, "seed"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 33}, "max_new_tokens"),
        ({"prompt_ids": ()}, "input_ids"),
        ({"prompt_ids": (1, VOCAB)}, "input_ids"),
        ({"stop_token_ids": frozenset({-1})}, "stop_token_ids"),
    ],
)
def test_bad_parameters_are_refused_by_name(change: dict[str, object], named: str) -> None:
    request = replace(GenerationRequest(prompt_ids=(1, 2)), **change)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=named):
        check(request, config(), VOCAB)


def test_prompt_and_new_tokens_over_the_context_are_refused() -> None:
    with pytest.raises(InputTooLong, match="context of 64"):
        check(GenerationRequest(prompt_ids=(1,) * 40, max_new_tokens=25), config(), VOCAB)


# --- the left-padded batch ---------------------------------------------------------------------


def prefilled(length: int, fill: float) -> DynamicCache:
    keys = torch.full((1, 2, length, 4), fill)
    return DynamicCache(ddp_cache_data=[(keys, keys + 100)])


def test_rows_join_left_padded_and_leave_with_the_columns_only_they_used() -> None:
    batch = DecodeBatch(torch.device("cpu"))
    batch.add([7], layers_of(prefilled(3, 1.0)), [3])
    batch.add([8], layers_of(prefilled(5, 2.0)), [5])  # longer: the batch is padded to it
    batch.add([9], layers_of(prefilled(2, 3.0)), [2])
    assert batch.rows == [7, 8, 9] and batch.columns == 5 and batch.tokens == 10
    assert batch.mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    keys = batch.layers[0][0]
    assert keys.shape == (3, 2, 5, 4)
    assert keys[0, 0, :, 0].tolist() == [0, 0, 1, 1, 1]
    assert batch.layers[0][1][2, 0, :, 0].tolist() == [0, 0, 0, 103, 103]
    batch.remove({8})
    assert batch.rows == [7, 9] and batch.columns == 3  # two padding-only columns dropped
    assert batch.mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch.positions.tolist() == [3, 2]
    batch.remove({7, 9})
    assert len(batch) == 0 and batch.tokens == 0


def test_rows_prefilled_together_join_at_once() -> None:
    batch = DecodeBatch(torch.device("cpu"))
    batch.add([7], layers_of(prefilled(2, 1.0)), [2])
    together = prefilled(4, 2.0)
    batch.add(
        [8, 9],
        [(k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)) for k, v in layers_of(together)],
        [4, 3],
    )
    assert batch.rows == [7, 8, 9] and batch.positions.tolist() == [2, 4, 3]
    assert batch.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]]


# --- prefix reuse ------------------------------------------------------------------------------


def kv(prompt: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A stand-in KV whose column i holds the token at i: slices can be checked."""
    keys = torch.tensor(prompt, dtype=torch.float)[None, None, :, None]
    return [(keys, keys + 0.5)]


def test_a_prompt_reuses_the_longest_stored_prefix_leaving_one_token() -> None:
    cache = PrefixCache(max_tokens=100)
    system = tuple(range(100, 120))  # 20 shared tokens
    cache.add((*system, 1, 2, 3), kv((*system, 1, 2, 3)))
    assert cache.find(tuple(range(100, 110)) + (5,) * 10) is None  # 10 shared: under 16
    found = cache.find((*system, 1, 9))
    assert found is not None and found[0][0][0, 0, :, 0].tolist() == [*system, 1]
    same = cache.find((*system, 1, 2, 3))  # the whole prompt again: its last token is prefilled
    assert same is not None and same[0][0].shape[2] == 22


def test_the_prefix_cache_keeps_within_its_bound_least_recently_used_first() -> None:
    cache = PrefixCache(max_tokens=50)
    a, b, c = (tuple(range(i, i + 20)) for i in (0, 100, 200))
    cache.add(a, kv(a))
    cache.add(b, kv(b))
    assert cache.find((*a, 7)) is not None  # a is now the most recently used
    cache.add(c, kv(c))  # 60 > 50: b goes
    assert cache.tokens == 40
    assert cache.find((*b, 7)) is None and cache.find((*a, 7)) is not None
    cache.add((*a, 1, 2), kv((*a, 1, 2)))  # covers a: a goes
    assert cache.tokens == 42
    cache.add(tuple(range(60)), kv(tuple(range(60))))  # over the bound alone: not kept
    assert cache.tokens == 42


# --- the ModelStreamInfer codec ----------------------------------------------------------------


def stream_request(**params: float | int) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="lm", id="r1")
    request.inputs.add(name="input_ids", datatype="INT64", shape=[1, 3])
    request.raw_input_contents.append(np.array([4, 5, 6], dtype="<i8").tobytes())
    for name, value in params.items():
        if isinstance(value, float):
            request.parameters[name].double_param = value
        else:
            request.parameters[name].int64_param = value
    return request


def test_a_request_becomes_a_generation_with_its_parameters() -> None:
    request = stream_request(max_new_tokens=5, temperature=1, top_p=0.5, seed=3, priority=1)
    stop = request.inputs.add(name="stop_token_ids", datatype="INT64", shape=[2])
    stop.contents.int64_contents.extend([9, 10])
    del request.raw_input_contents[:]  # typed contents for both inputs this time
    request.inputs[0].contents.int64_contents.extend([4, 5, 6])
    generation = codec.to_domain(request)
    assert generation.prompt_ids == (4, 5, 6) and generation.max_new_tokens == 5
    assert generation.sampling == Sampling(temperature=1.0, top_p=0.5, seed=3)
    assert generation.stop_token_ids == {9, 10}


@pytest.mark.parametrize(
    ("params", "named"),
    [({"temprature": 0.5}, "temprature"), ({"top_k": 2.5}, "top_k")],
)
def test_unknown_or_mistyped_parameters_are_refused(params: dict[str, float], named: str) -> None:
    with pytest.raises(InvalidInput, match=named):
        codec.to_domain(stream_request(**params))


def test_tokens_and_the_final_response_on_the_wire() -> None:
    request = stream_request()
    step = codec.to_wire(request, "1", Tokens((11, 12))).infer_response
    assert step.id == "r1" and step.model_version == "1"
    assert not step.parameters["triton_final_response"].bool_param
    assert list(step.outputs[0].shape) == [1, 2]
    assert np.frombuffer(step.raw_output_contents[0], "<i8").tolist() == [11, 12]
    final = codec.to_wire(request, "1", Finished("stop", 3, 2)).infer_response
    assert final.parameters["triton_final_response"].bool_param and not final.outputs
    assert final.parameters["finish_reason"].string_param == "stop"
    assert final.parameters["completion_tokens"].int64_param == 2
    error = codec.error_to_wire(request, InvalidInput("top_p must be in (0, 1], got 2"))
    assert error.error_message == "INVALID_ARGUMENT: top_p must be in (0, 1], got 2"
    assert error.infer_response.id == "r1"
