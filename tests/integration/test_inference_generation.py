"""Text generation through the inference service as a real grpc.aio server: ModelStreamInfer
called with the raw stub and with tritonclient's streaming, checked token for token against
`model.generate` in-process."""

from __future__ import annotations

import asyncio
import queue
import shutil
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_sync
from prometheus_client import REGISTRY
from transformers import AutoModelForCausalLM
from tritonclient.grpc import service_pb2, service_pb2_grpc

from fmserve.core.repository import ModelRepository
from fmserve.rpc.service import Service
from services.inference.__main__ import build
from services.inference.settings import InferenceSettings
from tests.models import GENERATION_TOML, build_causal_lm

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)

PROMPTS = [[5, 17, 99, 200, 3, 44], [7, 8, 9], list(range(10, 40)), [300, 301, 2, 302]]
BUNDLED = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two tiny LMs, plus `tiny-small`: a copy of tiny-llama with room for one sequence of
    at most 240 tokens, where a request waits 0.2 s for room at most."""
    root = tmp_path_factory.mktemp("generation")
    for family in ("llama", "gpt2"):
        build_causal_lm(root / f"tiny-{family}" / "1", family, seed=5)
        (root / f"tiny-{family}" / "model.toml").write_text(GENERATION_TOML)
    shutil.copytree(root / "tiny-llama", root / "tiny-small")
    (root / "tiny-small" / "model.toml").write_text(
        'task = "text-generation"\n[generation]\nmax_batch_tokens = 240\nmax_sequences = 1\n'
        "max_wait_s = 0.2\n"
    )
    shutil.copytree(BUNDLED / "minilm-embed", root / "minilm-embed")
    shutil.copytree(BUNDLED / "smollm2", root / "smollm2")
    return root


@pytest.fixture(scope="module")
async def service(repository: Path) -> AsyncIterator[Service]:
    settings = InferenceSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        grace_period_s=1.0,
        model_repository=repository,
        worker_enabled=False,
    )
    service = build(settings)
    await service.start()
    yield service
    await service.stop()


@pytest.fixture(scope="module")
async def stub(service: Service) -> AsyncIterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def request(model: str, ids: list[int], rid: str = "", **params: Any) -> Any:
    message = service_pb2.ModelInferRequest(model_name=model, id=rid)
    message.inputs.add(name="input_ids", datatype="INT64", shape=[1, len(ids)])
    message.raw_input_contents.append(np.array(ids, dtype="<i8").tobytes())
    for name, value in params.items():
        if name == "stop_token_ids":
            message.inputs.add(name=name, datatype="INT64", shape=[len(value)])
            message.raw_input_contents.append(np.array(value, dtype="<i8").tobytes())
        elif isinstance(value, float):
            message.parameters[name].double_param = value
        else:
            message.parameters[name].int64_param = value
    return message


@dataclass
class Outcome:
    tokens: list[int] = field(default_factory=list)
    responses: int = 0
    final: dict[str, Any] = field(default_factory=dict)
    error: str = ""


async def stream(stub: Any, requests: Iterable[Any]) -> dict[str, Outcome]:
    """Every request's tokens, final parameters or error, by request id."""
    outcomes: dict[str, Outcome] = {}
    async for response in stub.ModelStreamInfer(iter(list(requests))):
        reply = response.infer_response
        outcome = outcomes.setdefault(reply.id, Outcome())
        if response.error_message:
            outcome.error = response.error_message
            continue
        outcome.responses += 1
        if reply.raw_output_contents:
            outcome.tokens += np.frombuffer(reply.raw_output_contents[0], "<i8").tolist()
        if reply.parameters["triton_final_response"].bool_param:
            outcome.final = {
                name: getattr(p, p.WhichOneof("parameter_choice"))
                for name, p in reply.parameters.items()
            }
    return outcomes


def generated(folder: Path, prompt: list[int], max_new_tokens: int, **kwargs: Any) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(folder)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, **kwargs)
    return [int(t) for t in out[0, len(prompt) :]]


def gauge(name: str, model: str) -> float:
    return REGISTRY.get_sample_value(name, {"model": model}) or 0.0


# --- exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
async def test_greedy_equals_generate_token_for_token(
    stub: Any, repository: Path, model: str
) -> None:
    folder = repository / model / "1"
    expected = [generated(folder, p, 40, do_sample=False) for p in PROMPTS]
    # all four in one stream: they are decoded together, joining as they arrive
    outcomes = await stream(
        stub, [request(model, p, str(i), max_new_tokens=40) for i, p in enumerate(PROMPTS)]
    )
    for i, tokens in enumerate(expected):
        outcome = outcomes[str(i)]
        assert outcome.tokens == tokens, f"prompt {i}"
        assert outcome.final["finish_reason"] == "length"
        assert outcome.final["prompt_tokens"] == len(PROMPTS[i])
        assert outcome.final["completion_tokens"] == 40
        assert outcome.responses >= 2  # streamed, not answered once at the end


@pytest.mark.timeout(300)  # the first run on a machine converts the GGUF file (~60 s)
async def test_greedy_equals_generate_on_smollm2(stub: Any, repository: Path) -> None:
    from transformers import AutoTokenizer

    folder = ModelRepository(repository).get("smollm2").files()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    questions = ["What is the capital of France?", "Write a haiku about the sea."]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        for q in questions
    ]
    expected = [generated(folder, p, 24, do_sample=False) for p in prompts]
    outcomes = await stream(
        stub, [request("smollm2", p, str(i), max_new_tokens=24) for i, p in enumerate(prompts)]
    )
    assert [outcomes[str(i)].tokens for i in range(2)] == expected
    assert "Paris" in tokenizer.decode(outcomes["0"].tokens)


async def test_concurrent_streams_each_equal_their_own_sequential_result(stub: Any) -> None:
    prompts = [[(i * 37 + j * 11) % 590 + 3 for j in range(3 + i * 4)] for i in range(8)]
    settings = [
        {"max_new_tokens": 12 + i * 3, "temperature": 0.8, "seed": i} if i % 2 else {}
        for i in range(8)
    ]
    alone = []
    for prompt, params in zip(prompts, settings, strict=True):
        alone.append((await stream(stub, [request("tiny-llama", prompt, "a", **params)]))["a"])
    together = await asyncio.gather(
        *(
            stream(stub, [request("tiny-llama", p, "a", **s)])
            for p, s in zip(prompts, settings, strict=True)
        )
    )
    for i, (one, many) in enumerate(zip(alone, together, strict=True)):
        assert many["a"].tokens == one.tokens, f"stream {i}"
        # the second time, a prompt of 16 tokens or more reuses its KV but for the last token
        reused = len(prompts[i]) - 1 if len(prompts[i]) > 16 else 0
        assert many["a"].final == {**one.final, "cached_tokens": reused}


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
async def test_a_reused_prefix_keeps_greedy_equal_to_generate(
    stub: Any, repository: Path, model: str
) -> None:
    system = [(j * 29) % 580 + 11 for j in range(40)]
    prompts = [[*system, 3, 4, 5], [*system, 6], [*system[:30], 9, 9], [8, 7, 6]]
    folder = repository / model / "1"
    expected = [generated(folder, p, 20, do_sample=False) for p in prompts]
    first = await stream(stub, [request(model, prompts[0], "0", max_new_tokens=20)])
    # the other three in one call: prefilled together, two with the first prompt's KV
    rest = await stream(
        stub, [request(model, p, str(i), max_new_tokens=20) for i, p in enumerate(prompts) if i]
    )
    outcomes = {**first, **rest}
    assert [outcomes[str(i)].tokens for i in range(4)] == expected
    assert [outcomes[str(i)].final["cached_tokens"] for i in range(4)] == [0, 40, 30, 0]


async def test_a_seed_reproduces_a_sampled_generation(stub: Any) -> None:
    params = {"temperature": 1.0, "top_p": 0.95, "top_k": 50, "max_new_tokens": 30}
    runs = await stream(
        stub,
        [
            request("tiny-gpt2", PROMPTS[0], rid, seed=s, **params)
            for rid, s in (("a", 7), ("b", 7))
        ],
    )
    other = await stream(stub, [request("tiny-gpt2", PROMPTS[0], "c", seed=8, **params)])
    assert runs["a"].tokens == runs["b"].tokens
    assert other["c"].tokens != runs["a"].tokens


async def test_stop_token_ids_end_the_generation_with_stop(stub: Any, repository: Path) -> None:
    expected = generated(repository / "tiny-llama" / "1", PROMPTS[2], 20, do_sample=False)
    stop_at = next(i for i, t in enumerate(expected) if expected.index(t) == i and i >= 3)
    outcome = (
        await stream(
            stub,
            [request("tiny-llama", PROMPTS[2], "s", stop_token_ids=[expected[stop_at]])],
        )
    )["s"]
    assert outcome.tokens == expected[: stop_at + 1]
    assert outcome.final["finish_reason"] == "stop"


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"temperature": -1.0}, "INVALID_ARGUMENT: temperature"),
        ({"top_p": 0.0}, "INVALID_ARGUMENT: top_p"),
        ({"top_p": 1.5}, "INVALID_ARGUMENT: top_p"),
        ({"top_k": -1}, "INVALID_ARGUMENT: top_k"),
        ({"max_new_tokens": 0}, "INVALID_ARGUMENT: max_new_tokens"),
        ({"max_new_tokens": 129}, "INVALID_ARGUMENT: max_new_tokens"),
        ({"repetition_penalty": -2.0}, "INVALID_ARGUMENT: repetition_penalty"),
        ({"bogus": 1}, "INVALID_ARGUMENT: unknown parameter 'bogus'"),
    ],
)
async def test_bad_parameters_fail_alone_in_stream(
    stub: Any, params: dict[str, Any], named: str
) -> None:
    outcomes = await stream(
        stub,
        [request("tiny-llama", [5, 6], "bad", **params), request("tiny-llama", [5, 6], "good")],
    )
    assert outcomes["bad"].error.startswith(named)
    assert outcomes["good"].final["finish_reason"] == "length"  # the stream went on


async def test_prompts_over_the_context_and_wrong_models_are_refused(stub: Any) -> None:
    outcomes = await stream(
        stub,
        [
            request("tiny-llama", [5] * 200, "long", max_new_tokens=100),
            request("tiny-llama", [600], "vocab"),
            request("minilm-embed", [101, 102], "encoder"),
            request("nope", [1], "unknown"),
        ],
    )
    assert outcomes["long"].error.startswith("INVALID_ARGUMENT: the prompt has 200 tokens")
    assert outcomes["vocab"].error.startswith("INVALID_ARGUMENT: input_ids must lie in [0, 600)")
    assert outcomes["encoder"].error.startswith("INVALID_ARGUMENT: model 'minilm-embed' is a")
    assert outcomes["unknown"].error.startswith("NOT_FOUND: unknown model 'nope'")


async def test_model_infer_on_a_generation_model_points_to_the_stream(stub: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ModelInfer(request("tiny-llama", [5, 6]))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "ModelStreamInfer" in (caught.value.details() or "")


# --- budget and cancellation -------------------------------------------------------------------


async def test_a_request_waits_for_room_then_gets_resource_exhausted(stub: Any) -> None:
    too_big = await stream(stub, [request("tiny-small", [5] * 30, "x", max_new_tokens=220)])
    assert too_big["x"].error.startswith("RESOURCE_EXHAUSTED:")  # can never fit: at once
    assert "max_batch_tokens" in too_big["x"].error
    # the one sequence of room, taken for 200 steps (seconds: far longer than the wait)
    holder = stub.ModelStreamInfer(iter([request("tiny-small", [5] * 10, "h", max_new_tokens=200)]))
    assert (await holder.read()).infer_response.raw_output_contents
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiting = await stream(stub, [request("tiny-small", [6] * 5, "w", max_new_tokens=5)])
    waited = loop.time() - started
    holder.cancel()
    assert waiting["w"].error.startswith("RESOURCE_EXHAUSTED: no room")
    assert 0.15 < waited < 5
    # once the holder is gone, the same request runs
    for _ in range(100):
        if gauge("fmserve_inference_sequences_active", "tiny-small") == 0:
            break
        await asyncio.sleep(0.02)
    again = await stream(stub, [request("tiny-small", [6] * 5, "w", max_new_tokens=5)])
    assert again["w"].final["finish_reason"] == "length"


async def test_cancelling_a_stream_frees_its_sequence(stub: Any) -> None:
    call = stub.ModelStreamInfer(iter([request("tiny-llama", [5, 6, 7], "c", max_new_tokens=128)]))
    await call.read()
    assert gauge("fmserve_inference_sequences_active", "tiny-llama") == 1
    call.cancel()
    for _ in range(100):
        if gauge("fmserve_inference_sequences_active", "tiny-llama") == 0:
            break
        await asyncio.sleep(0.02)
    assert gauge("fmserve_inference_sequences_active", "tiny-llama") == 0
    for _ in range(100):  # the rows leave at the next step, with their KV entries
        if gauge("fmserve_inference_kv_cache_tokens", "tiny-llama") == 0:
            break
        await asyncio.sleep(0.02)
    assert gauge("fmserve_inference_kv_cache_tokens", "tiny-llama") == 0
    assert gauge("fmserve_inference_kv_cache_reserved_tokens", "tiny-llama") == 0


async def test_a_deadline_frees_the_sequence(stub: Any) -> None:
    call = stub.ModelStreamInfer(
        iter([request("tiny-gpt2", [5, 6, 7], "d", max_new_tokens=128)]), timeout=0.3
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            await asyncio.sleep(0.05)  # a slow reader: the deadline passes mid-stream
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):
        if gauge("fmserve_inference_sequences_active", "tiny-gpt2") == 0:
            break
        await asyncio.sleep(0.02)
    assert gauge("fmserve_inference_sequences_active", "tiny-gpt2") == 0


async def test_a_stopping_service_ends_running_streams_cancelled(repository: Path) -> None:
    """Past the grace, a stream still running ends with a normal final response, finish reason
    "cancelled", carrying the tokens it had streamed, not with an error."""
    settings = InferenceSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        grace_period_s=1.0,
        model_repository=repository,
        worker_enabled=False,
    )
    service = build(settings)
    await service.start()
    stopping: asyncio.Task[None] | None = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            # smollm2 takes seconds for 1000 tokens: the drain ends it half a second in
            story = request("smollm2", [28, 1, 92, 7, 314, 15], "a", max_new_tokens=1000)
            outcome = Outcome()
            async for response in stub.ModelStreamInfer(iter([story])):
                assert not response.error_message
                reply = response.infer_response
                if reply.raw_output_contents:
                    outcome.tokens += np.frombuffer(reply.raw_output_contents[0], "<i8").tolist()
                if stopping is None:
                    stopping = asyncio.create_task(service.stop())
                if reply.parameters["triton_final_response"].bool_param:
                    outcome.final = {
                        name: getattr(p, p.WhichOneof("parameter_choice"))
                        for name, p in reply.parameters.items()
                    }
    finally:
        await (stopping or service.stop())
    assert outcome.final["finish_reason"] == "cancelled"
    assert outcome.final["completion_tokens"] == len(outcome.tokens)
    assert 0 < len(outcome.tokens) < 1000


async def test_generation_metrics_are_recorded(stub: Any) -> None:
    get = REGISTRY.get_sample_value
    before = get("fmserve_inference_generated_tokens_total", {"model": "tiny-gpt2"}) or 0.0
    await stream(stub, [request("tiny-gpt2", [5, 6], "m", max_new_tokens=6)])
    after = get("fmserve_inference_generated_tokens_total", {"model": "tiny-gpt2"})
    assert after == before + 6
    assert get("fmserve_inference_time_to_first_token_seconds_count", {"model": "tiny-gpt2"})
    assert get("fmserve_inference_inter_token_latency_seconds_count", {"model": "tiny-gpt2"})


# --- tritonclient --------------------------------------------------------------------------------


async def test_tritonclient_streaming_generates(service: Service, repository: Path) -> None:
    expected = generated(repository / "tiny-llama" / "1", PROMPTS[0], 10, do_sample=False)
    results = await asyncio.to_thread(triton_stream, service.port, PROMPTS[0])
    tokens = [t for r in results for t in (r.as_numpy("token_ids") or np.zeros((1, 0))).ravel()]
    assert tokens == expected
    final = results[-1].get_response().parameters
    assert final["triton_final_response"].bool_param
    assert final["finish_reason"].string_param == "length"
    assert not any(
        r.get_response().parameters["triton_final_response"].bool_param for r in results[:-1]
    )


def triton_stream(port: int, prompt: list[int]) -> list[Any]:
    """tritonclient's own streaming (start_stream / async_stream_infer), until the final."""
    replies: queue.Queue[Any] = queue.Queue()
    client = triton_sync.InferenceServerClient(f"127.0.0.1:{port}")
    client.start_stream(callback=lambda result, error: replies.put(error or result))
    ids = triton_sync.InferInput("input_ids", [1, len(prompt)], "INT64")
    ids.set_data_from_numpy(np.array([prompt], dtype=np.int64))
    client.async_stream_infer(
        "tiny-llama", [ids], request_id="t", parameters={"max_new_tokens": 10}
    )
    results = []
    try:
        while True:
            reply = replies.get(timeout=30)
            if isinstance(reply, Exception):
                raise reply
            results.append(reply)
            if reply.get_response().parameters["triton_final_response"].bool_param:
                return results
    finally:
        client.stop_stream()
        client.close()


async def test_metadata_and_config_describe_a_decoupled_generation_model(stub: Any) -> None:
    metadata = await stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="tiny-llama"))
    assert [(t.name, list(t.shape)) for t in metadata.inputs] == [
        ("input_ids", [1, -1]),
        ("stop_token_ids", [-1]),
    ]
    assert [(t.name, t.datatype) for t in metadata.outputs] == [("token_ids", "INT64")]
    config = (await stub.ModelConfig(service_pb2.ModelConfigRequest(name="tiny-llama"))).config
    assert config.model_transaction_policy.decoupled and config.max_batch_size == 0
    assert config.parameters["max_new_tokens"].string_value == "128"
    assert config.parameters["task"].string_value == "text-generation"
