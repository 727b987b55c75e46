"""Generation through the five real services: gateway Generate → preprocess EncodePrompt →
inference ModelStreamInfer ⇄ postprocess Detokenize, on the test repository's tiny Llama and
GPT-2, checked against transformers' `model.generate` in-process."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fmserve.cli.commands import main as cli_main
from fmserve.client import AsyncClient, Client, Generation, GenerationDelta
from fmserve.core.repository import ModelRepository
from fmserve.errors import DeadlineExceeded, InputTooLong, InvalidInput, Unavailable, WrongTask
from tests.e2e.conftest import metric

pytestmark = pytest.mark.timeout(300)

REPOSITORY_POLL_S = 2.0  # FMSERVE_REPOSITORY_POLL_S's default
PROMPTS = [
    "def generate(prompt: str) -> str:",
    "numbers 0123",
    "return prompt",
    "the quick brown fox",
    "str) -> str",
    "hello world",
    "# numbers 9876543210",
    "prompt[::-1]",
]


@pytest.fixture(scope="module")
def client(gateway_address: str):
    with Client(gateway_address, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def reference(model_repository: Path):
    """The tiny models in-process, as `model.generate` runs them."""
    loaded = {}
    for name in ("tiny-llama", "tiny-gpt2"):
        folder = model_repository / name / "1"
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        loaded[name] = (model, AutoTokenizer.from_pretrained(folder))
    return loaded


def greedy(reference, model: str, prompt: str, max_new_tokens: int) -> list[int]:
    lm, tokenizer = reference[model]
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = lm.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return out[0, ids.shape[1] :].tolist()


def unique(prompt: str) -> str:
    """A prompt no other test sent: its first answer cannot come from the cache."""
    return f"{prompt} {uuid.uuid4().hex[:6]}"


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_greedy_equals_model_generate_token_for_token(client, reference, model):
    for prompt in PROMPTS[:3]:
        g = client.generate(prompt, model=model, max_new_tokens=24, cache="bypass")

        assert g.token_ids == greedy(reference, model, prompt, 24), prompt
        tokenizer = reference[model][1]
        assert g.text == tokenizer.decode(g.token_ids, skip_special_tokens=True)
        assert g.finish_reason == ("length" if len(g.token_ids) == 24 else "stop")
        assert g.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
        assert g.usage.completion_tokens == len(g.token_ids)
        assert not g.cached


def test_stream_deltas_concatenate_to_the_final_text(client, reference):
    events = list(client.stream(unique("numbers"), model="tiny-llama", max_new_tokens=40))

    *deltas, final = events
    assert isinstance(final, Generation) and deltas
    assert all(isinstance(d, GenerationDelta) for d in deltas)
    assert "".join(d.text for d in deltas) == final.text
    assert [t for d in deltas for t in d.token_ids] == final.token_ids
    # A random tiny model may emit byte tokens that make no valid UTF-8: the full decode has
    # U+FFFD there too. Whole characters split over tokens are the unit tests' subject.
    assert final.text == reference["tiny-llama"][1].decode(
        final.token_ids, skip_special_tokens=True
    )


@pytest.mark.parametrize("prompt", PROMPTS[:4])
def test_a_stop_string_across_token_boundaries(client, reference, prompt):
    # The prompt as it is (no unique suffix; the cache is bypassed): the seeded tiny model then
    # gives the same text every run, so whether it has a boundary to cut is not left to chance.
    tokenizer = reference["tiny-llama"][1]
    full = client.generate(prompt, model="tiny-llama", max_new_tokens=40, cache="bypass")
    stop = _across_a_boundary(tokenizer, full)
    expected = full.text[: full.text.index(stop)]

    events = list(
        client.stream(prompt, model="tiny-llama", max_new_tokens=40, stop=[stop], cache="bypass")
    )

    final = events[-1]
    assert final.finish_reason == "stop"
    assert final.text == expected
    assert "".join(e.text for e in events[:-1]) == expected
    assert final.token_ids == full.token_ids[: len(final.token_ids)]  # the same run, cut short


def _across_a_boundary(tokenizer, full: Generation) -> str:
    """Two characters of the text: the end of one token's and the start of the next one's."""
    pieces = [
        tokenizer.decode(full.token_ids[:n], skip_special_tokens=True)
        for n in range(len(full.token_ids) + 1)
    ]
    for k in range(3, len(pieces) - 1):
        before, after = pieces[k], pieces[k + 1]
        if before and len(after) > len(before) and after.startswith(before):
            stop = before[-1] + after[len(before)]
            if "\ufffd" not in stop and stop in full.text:
                return stop
    raise AssertionError(f"no token boundary to test in {full.text!r}")


def test_finish_reasons_length_and_stop_token(client):
    prompt = unique(PROMPTS[1])
    long = client.generate(prompt, model="tiny-llama", max_new_tokens=6, cache="bypass")
    assert (long.finish_reason, len(long.token_ids)) == ("length", 6)

    third = long.token_ids[2]
    cut = client.generate(
        prompt, model="tiny-llama", max_new_tokens=6, stop_token_ids=[third], cache="bypass"
    )
    assert cut.finish_reason == "stop"
    assert cut.token_ids == long.token_ids[: long.token_ids.index(third) + 1]


def test_chat_messages_go_through_the_chat_template(client, reference):
    lm, tokenizer = reference["tiny-llama"]
    messages = [{"role": "system", "content": "Reverse it."}, {"role": "user", "content": "abc"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.no_grad():
        out = lm.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=2)

    g = client.generate(messages=messages, model="tiny-llama", max_new_tokens=12, cache="bypass")

    assert g.token_ids == out[0, ids.shape[1] :].tolist()
    assert g.usage.prompt_tokens == ids.shape[1]


def test_seeded_sampling_is_reproducible(client):
    prompt = unique(PROMPTS[3])
    runs = [
        client.generate(
            prompt, model="tiny-llama", max_new_tokens=16, temperature=1.0, seed=11, cache="bypass"
        )
        for _ in range(2)
    ]
    assert runs[0].token_ids == runs[1].token_ids


def test_a_deterministic_repeat_is_answered_from_the_cache(client):
    prompt = unique(PROMPTS[5])
    first = client.generate(prompt, model="tiny-gpt2", max_new_tokens=12)
    deadline = time.monotonic() + 5  # the store is in the background
    while not (again := client.generate(prompt, model="tiny-gpt2", max_new_tokens=12)).cached:
        assert time.monotonic() < deadline, "the repeat never came from the cache"
        time.sleep(0.1)

    assert not first.cached
    assert (again.text, again.token_ids, again.finish_reason) == (
        first.text,
        first.token_ids,
        first.finish_reason,
    )
    other = client.generate(prompt, model="tiny-gpt2", max_new_tokens=11)
    assert not other.cached  # another parameter, another key
    assert not client.generate(prompt, model="tiny-gpt2", max_new_tokens=12, cache="bypass").cached


def test_eight_concurrent_streams_are_each_correct(gateway_address, reference):
    async def run() -> list[Generation]:
        async with AsyncClient(gateway_address, timeout=120) as client:
            calls = [
                client.generate(p, model="tiny-llama", max_new_tokens=20, cache="bypass")
                for p in PROMPTS
            ]
            return list(await asyncio.gather(*calls))

    results = asyncio.run(run())

    for prompt, g in zip(PROMPTS, results, strict=True):
        assert g.token_ids == greedy(reference, "tiny-llama", prompt, 20), prompt


def test_cancel_mid_stream_frees_the_sequence(client, cluster):
    stream = client.stream(unique("cancel"), model="tiny-llama", max_new_tokens=128, cache="bypass")
    first = next(stream)
    assert isinstance(first, GenerationDelta)
    stream.close()  # the client cancels the call

    deadline = time.monotonic() + 10
    while metric(cluster, "inference", "fmserve_inference_sequences_active", model="tiny-llama"):
        assert time.monotonic() < deadline, "the cancelled sequence is still decoding"
        time.sleep(0.1)
    assert client.generate("after", model="tiny-llama", max_new_tokens=4).token_ids


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"prompt": ""}, InvalidInput, "prompt is empty and there are no messages"),
        (
            {"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
            InvalidInput,
            "prompt and messages are both set",
        ),
        ({"messages": [{"role": "", "content": "y"}]}, InvalidInput, r"messages\[0\].role"),
        ({"messages": [{"role": "user", "content": ""}]}, InvalidInput, r"messages\[0\].content"),
        ({"prompt": "hello " * 300}, InputTooLong, "prompt is .* tokens and max_new_tokens"),
        ({"prompt": "x", "max_new_tokens": 0}, InvalidInput, "max_new_tokens must be 1 to 128"),
        ({"prompt": "x", "max_new_tokens": 129}, InvalidInput, "max_new_tokens must be 1 to 128"),
        ({"prompt": "x", "temperature": -1}, InvalidInput, "temperature must be >= 0"),
        ({"prompt": "x", "top_p": 0}, InvalidInput, r"top_p must be in \(0, 1\]"),
        ({"prompt": "x", "top_p": 1.5}, InvalidInput, r"top_p must be in \(0, 1\]"),
        ({"prompt": "x", "top_k": -1}, InvalidInput, "top_k must be 0"),
        ({"prompt": "x", "stop": ["a"] * 17}, InvalidInput, "stop has 17 strings"),
        ({"prompt": "x", "stop": ["a", ""]}, InvalidInput, r"stop\[1\] is empty"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(client, kwargs, error, message):
    with pytest.raises(error, match=message):
        client.generate(model="tiny-llama", **kwargs)


def test_generate_on_an_encoder_is_a_wrong_task(client):
    with pytest.raises(WrongTask, match="minilm-embed"):
        client.generate("hello", model="minilm-embed")
    with pytest.raises(WrongTask, match="tiny-llama"):
        client.embed(["hello"], model="tiny-llama")


@pytest.mark.parametrize("stage", ["postprocess", "inference"])
def test_a_stage_killed_mid_stream_fails_it_unavailable_then_recovers(client, cluster, stage):
    replica = cluster.replicas_of[stage][0]
    assert replica.process is not None
    events = client.stream(unique("kill"), model="tiny-llama", max_new_tokens=128, cache="bypass")
    assert isinstance(next(events), GenerationDelta)

    replica.process.kill()
    replica.process.wait()
    started = time.monotonic()
    with pytest.raises(Unavailable, match=stage):
        for _ in events:
            pass
    assert time.monotonic() - started < 10

    cluster.supervise_once()
    cluster.wait_healthy(replica, time.monotonic() + 120)
    generates_again(client, stage)


def generates_again(client: Client, stage: str) -> None:
    """Wait until the gateway reaches a restarted stage: a generation no cache can answer (a
    CI run once took a repeated prompt's cached answer for recovery, and the next test's first
    call met the gateway's channel still reconnecting). Healthy to its own probe, a stage is
    reached within the gateway's reconnect backoff (1 s)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            prompt = unique("back")
            answer = client.generate(prompt, model="tiny-llama", max_new_tokens=4, cache="bypass")
            assert answer.token_ids
            return
        except Unavailable:
            assert time.monotonic() < deadline, f"the gateway did not reach the restarted {stage}"
            time.sleep(0.2)


def test_a_passed_deadline_ends_the_stream_and_frees_the_sequence(client, cluster):
    # A fixed prompt the seeded model answers with all 128 tokens (a random one may meet EOS
    # after a few and finish inside any deadline). The deadline is a quarter of the fastest
    # warm answer, so it falls mid-decode on a fast machine as on a slow one (the first answer
    # of a cluster pays for warm-up: 2.8 s against 0.46 s here).
    took = []
    for _ in range(3):
        started = time.monotonic()
        full = client.generate("slow", model="tiny-llama", max_new_tokens=128, cache="bypass")
        took.append(time.monotonic() - started)
        assert full.finish_reason == "length"
    with pytest.raises(DeadlineExceeded):
        client.generate(
            "slow", model="tiny-llama", max_new_tokens=128, cache="bypass", timeout=min(took) / 4
        )

    deadline = time.monotonic() + 10
    while metric(cluster, "inference", "fmserve_inference_sequences_active", model="tiny-llama"):
        assert time.monotonic() < deadline, "the expired sequence is still decoding"
        time.sleep(0.1)


def seen_by_every_service(client: Client, model: str) -> None:
    """Wait until a model added to the running cluster's repository is listed by the gateway,
    then one more poll: every service rereads the repository every 2 s, on its own clock."""
    deadline = time.monotonic() + 10
    while model not in {m.name for m in client.models()}:
        assert time.monotonic() < deadline, f"{model} is not listed"
        time.sleep(0.1)
    time.sleep(REPOSITORY_POLL_S)


def test_smollm2_chat_greedy_equals_model_generate(client, model_repository):
    bundled = Path(__file__).resolve().parents[2] / "models" / "smollm2" / "model.toml"
    (model_repository / "smollm2").mkdir(exist_ok=True)
    shutil.copy(bundled, model_repository / "smollm2" / "model.toml")
    folder = ModelRepository(model_repository).get("smollm2").files()
    lm = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    seen_by_every_service(client, "smollm2")

    reused = []
    for question in ("What is the capital of France?", "Write one word: ça, 東京 or 😀?"):
        messages = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(ids, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = lm.generate(ids, max_new_tokens=16, do_sample=False)
        expected = out[0, ids.shape[1] :].tolist()

        events = list(client.stream(messages=messages, model="smollm2", max_new_tokens=16))

        final = events[-1]
        assert final.token_ids == expected, question
        assert final.text == tokenizer.decode(expected, skip_special_tokens=True)
        assert "".join(e.text for e in events[:-1]) == final.text
        reused.append(final.usage.cached_tokens)
    # the second prompt starts with the chat template's system preamble the first one left in
    # the engine's prefix cache: that KV is reused, and the tokens are still generate's
    assert reused[1] >= 16


def test_a_draining_inference_service_ends_a_running_stream_cancelled(client, cluster):
    """SIGTERM: the inference service drains for FMSERVE_INFERENCE_GRACE_PERIOD_S (3 s here),
    then ends the streams still running "cancelled", with their text so far."""
    replica = cluster.replicas_of["inference"][0]
    assert replica.process is not None
    # smollm2 (the test above put it in the repository) counts on for far more than 3 s
    stream = client.stream(
        "1, 2, 3, 4, 5, 6, 7, 8,", model="smollm2", max_new_tokens=1000, cache="bypass"
    )
    events = [next(stream)]
    replica.process.terminate()
    events += list(stream)

    final = events[-1]
    assert isinstance(final, Generation) and final.finish_reason == "cancelled"
    assert 0 < final.usage.completion_tokens == len(final.token_ids) < 1000
    assert "".join(e.text for e in events[:-1]) == final.text
    assert replica.process.wait(timeout=30) == 0

    cluster.supervise_once()
    cluster.wait_healthy(replica, time.monotonic() + 120)
    generates_again(client, "inference")


def test_the_cli_prints_text_as_it_arrives_and_json(client, gateway_address, capsys):
    prompt = unique("cli")
    expected = client.generate(prompt, model="tiny-llama", max_new_tokens=8, cache="bypass")
    base = ["--address", gateway_address, "generate", "--model", "tiny-llama", prompt]

    assert cli_main([*base, "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert out == expected.text
    assert f"[{expected.finish_reason}: " in err

    assert cli_main([*base, "--max-new-tokens", "8", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["text"], printed["token_ids"]) == (expected.text, expected.token_ids)

    stop = expected.text[:1]  # the answer ends before it says anything: a hint follows
    assert stop and cli_main([*base, "--max-new-tokens", "8", "--stop", stop]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "a chat model may want --chat" in err

    assert cli_main([*base, "--top-p", "2"]) == 1
    assert "error (INVALID_ARGUMENT): top_p must be in (0, 1]" in capsys.readouterr().err
