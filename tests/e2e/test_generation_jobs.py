"""Generation jobs through the five real services over real RabbitMQ and Redis: SubmitJob with
sampling parameters → preprocess (prompts encoded as EncodePrompt encodes them) → inference (a
chunk's items on the scheduler together) → postprocess (text, stop strings) → the job's
results, each item equal to what the synchronous Generate path gives for its prompt."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from pathlib import Path

import pytest

from fmserve.cli.cluster import Cluster
from fmserve.cli.commands import main as cli_main
from fmserve.client import AsyncClient, Client, Generation, GenerationParams
from fmserve.errors import InvalidInput, WrongTask
from tests.e2e import test_generation as streams
from tests.e2e.test_generation import PROMPTS, _across_a_boundary, greedy, metric

# The fixtures of the streaming tests, shared: the client, and the tiny models in-process.
client = streams.client
reference = streams.reference

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

# Twelve fixed prompts: the seeded tiny models answer each the same way every run.
JOB_PROMPTS = [*PROMPTS, "a b c d", "import torch", "1, 2, 3,", "The end."]
JOB_WAIT_S = 240


def generations(client: Client, job_id: str) -> list[Generation]:
    """A finished job's results, every item a Generation (asserts that none failed)."""
    job = client.job(job_id)
    assert job.wait(timeout=JOB_WAIT_S).state == "succeeded"
    items = list(job.results())
    assert [item.index for item in items] == list(range(len(items)))
    assert all(item.ok and isinstance(item.result, Generation) for item in items), items
    return [item.result for item in items]


def same(job: Generation, sync: Generation) -> None:
    assert (job.text, job.token_ids, job.finish_reason) == (
        sync.text,
        sync.token_ids,
        sync.finish_reason,
    )
    assert (job.usage.prompt_tokens, job.usage.completion_tokens) == (
        sync.usage.prompt_tokens,
        sync.usage.completion_tokens,
    )


def test_a_greedy_job_equals_the_sync_path_item_for_item(client, reference):
    job = client.submit(JOB_PROMPTS, model="tiny-llama", task="generate", max_new_tokens=24)

    results = generations(client, job.id)

    assert len(results) == len(JOB_PROMPTS)
    for prompt, result in zip(JOB_PROMPTS, results, strict=True):
        sync = client.generate(prompt, model="tiny-llama", max_new_tokens=24, cache="bypass")
        same(result, sync)
    for prompt, result in list(zip(JOB_PROMPTS, results, strict=True))[:2]:
        assert result.token_ids == greedy(reference, "tiny-llama", prompt, 24), prompt


def test_seeded_sampling_items_equal_their_sync_counterparts(client):
    params = GenerationParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=11)
    job = client.submit(JOB_PROMPTS[:4], model="tiny-gpt2", task="generate", params=params)

    results = generations(client, job.id)

    for prompt, result in zip(JOB_PROMPTS[:4], results, strict=True):
        sync = client.generate(prompt, model="tiny-gpt2", params=params, cache="bypass")
        same(result, sync)


def test_stop_strings_and_finish_reasons_in_job_results(client, reference):
    prompt = PROMPTS[0]
    full = client.generate(prompt, model="tiny-llama", max_new_tokens=40, cache="bypass")
    stop = _across_a_boundary(reference["tiny-llama"][1], full)
    third = full.token_ids[2]

    stopped = client.submit(
        [prompt], model="tiny-llama", task="generate", max_new_tokens=40, stop=[stop]
    )
    by_token = client.submit(
        [prompt], model="tiny-llama", task="generate", max_new_tokens=40, stop_token_ids=[third]
    )
    short = client.submit([prompt], model="tiny-llama", task="generate", max_new_tokens=5)

    [cut] = generations(client, stopped.id)
    assert (cut.text, cut.finish_reason) == (full.text[: full.text.index(stop)], "stop")
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]
    assert cut.usage.completion_tokens == len(cut.token_ids)
    # A stream stops at the step that completed the stop string: the same text; its token ids
    # are the job's, and maybe the few more tokens its last step brought.
    sync = client.generate(
        prompt, model="tiny-llama", max_new_tokens=40, stop=[stop], cache="bypass"
    )
    assert (sync.text, sync.finish_reason) == (cut.text, "stop")
    assert sync.token_ids[: len(cut.token_ids)] == cut.token_ids
    [at_token] = generations(client, by_token.id)
    assert at_token.finish_reason == "stop"
    assert at_token.token_ids == full.token_ids[: full.token_ids.index(third) + 1]
    [length] = generations(client, short.id)
    assert (length.finish_reason, length.token_ids) == ("length", full.token_ids[:5])


def test_a_prompt_over_the_context_fails_alone_with_its_error(client):
    prompts = ["hello world", "hello " * 300, "the quick brown fox"]

    job = client.submit(prompts, model="tiny-llama", task="generate", max_new_tokens=16)

    status = job.wait(timeout=JOB_WAIT_S)
    assert (status.state, status.done, status.failed) == ("succeeded", 2, 1)
    items = list(job.results())
    assert [item.ok for item in items] == [True, False, True]
    assert re.search(
        r"prompt is \d+ tokens and max_new_tokens is 16: together over", items[1].error
    )
    assert "context of 256 tokens" in items[1].error
    for item, prompt in zip([items[0], items[2]], [prompts[0], prompts[2]], strict=True):
        same(
            item.result,
            client.generate(prompt, model="tiny-llama", max_new_tokens=16, cache="bypass"),
        )


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be 1 to 128"),
        ({"max_new_tokens": 129}, "max_new_tokens must be 1 to 128"),
        ({"temperature": -1}, "temperature must be >= 0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be 0"),
        ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
        ({"stop": ["a", ""]}, r"stop\[1\] is empty"),
        ({"stop": ["a"] * 17}, "stop has 17 strings"),
    ],
)
def test_bad_sampling_parameters_are_refused_at_submission(client, sampling, message):
    key = uuid.uuid4().hex  # nothing may be created: the same key is free again afterwards
    with pytest.raises(InvalidInput, match=message):
        client.submit(
            ["hello"], model="tiny-llama", task="generate", idempotency_key=key, **sampling
        )
    assert key not in [job.idempotency_key for job in client.jobs()]


def test_the_wrong_task_either_way_is_refused(client):
    with pytest.raises(WrongTask, match="minilm-embed' does embedding, not text-generation"):
        client.submit(["hello"], model="minilm-embed", task="generate")
    with pytest.raises(WrongTask, match="tiny-llama' does text-generation, not embedding"):
        client.submit(["hello"], model="tiny-llama", task="embedding")
    with pytest.raises(WrongTask, match="tiny-llama' does text-generation"):
        client.submit(["hello"], model="tiny-llama")


def test_the_async_client_submits_and_reads_generations(client, gateway_address):
    async def run() -> list[Generation]:
        async with AsyncClient(gateway_address, timeout=120) as aclient:
            job = await aclient.submit(
                JOB_PROMPTS[:3], model="tiny-llama", task="generate", max_new_tokens=12
            )
            assert (await job.wait(timeout=JOB_WAIT_S)).state == "succeeded"
            return [item.result async for item in job.results()]

    results = asyncio.run(run())

    for prompt, result in zip(JOB_PROMPTS[:3], results, strict=True):
        same(result, client.generate(prompt, model="tiny-llama", max_new_tokens=12, cache="bypass"))


def test_the_cli_submits_a_generation_job_and_prints_its_results(
    client, gateway_address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    source = tmp_path / "prompts.jsonl"
    source.write_text("\n".join(json.dumps({"text": p}) for p in JOB_PROMPTS[:2]))
    out = tmp_path / "results.jsonl"
    args = ["--address", gateway_address, "submit", "--model", "tiny-llama", "--task", "generate"]

    code = cli_main([*args, "--max-new-tokens", "8", "--input", str(source), "--output", str(out)])

    assert code == 0
    job_id = capsys.readouterr().out.split()[2]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["index"] for row in rows] == [0, 1]
    for prompt, row in zip(JOB_PROMPTS[:2], rows, strict=True):
        sync = client.generate(prompt, model="tiny-llama", max_new_tokens=8, cache="bypass")
        assert (row["result"]["text"], row["result"]["token_ids"]) == (sync.text, sync.token_ids)
        assert row["result"]["finish_reason"] == sync.finish_reason
    assert cli_main(["--address", gateway_address, "results", job_id]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows
    bad = cli_main([*args, "--top-p", "2", "--input", str(source)])
    assert bad == 1
    assert "error (INVALID_ARGUMENT): top_p must be in (0, 1]" in capsys.readouterr().err


def test_cancelling_a_running_job_stops_its_sequences(client, cluster: Cluster):
    def active() -> float:
        return metric(
            cluster, "inference", "fmserve_inference_sequences_active", model="tiny-llama"
        )

    tag = uuid.uuid4().hex[:6]
    prompts = [f"{tag} item {i}: count on" for i in range(400)]
    job = client.submit(prompts, model="tiny-llama", task="generate", max_new_tokens=128)
    deadline = time.monotonic() + 60
    while not active():
        assert time.monotonic() < deadline, "the job's sequences never started"
        time.sleep(0.05)

    assert job.cancel().state == "cancelled"

    # The inference stage sees the job end within job_state_ttl_s (1 s) and cancels the chunk.
    deadline = time.monotonic() + 10
    while active():
        assert time.monotonic() < deadline, "the cancelled job's sequences are still decoding"
        time.sleep(0.1)
    status = job.status()
    assert status.state == "cancelled" and status.answered < len(prompts)
