"""The asynchronous path end to end: five services as processes, real RabbitMQ, real Redis,
through the public client and CLI. Faults are real: kill -9 of a stage, RabbitMQ dropping every
connection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from fmserve import Client
from fmserve.cli import main as cli
from fmserve.cli.cluster import Cluster
from fmserve.client import Job
from fmserve.errors import Conflict, InvalidInput, NotFound, Overloaded
from tests.e2e.conftest import DELIVERY_LIMIT, MAX_ITEMS, MAX_JOB_ITEMS, metric

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def client(gateway_address: str) -> Client:
    with Client(gateway_address) as c:
        yield c


def texts(count: int, tag: str = "") -> list[str]:
    tag = tag or uuid.uuid4().hex[:6]
    return [f"item {i} of a batch job ({tag}): words {i % 7} and {i % 11}" for i in range(count)]


def long_texts(count: int) -> list[str]:
    """Texts of about 50 tokens: slow enough that a job is still running when a test acts."""
    tag = uuid.uuid4().hex[:6]
    words = ["the", "model", "reads", "every", "word", "of", "this", "sentence", "and", "more"]
    return [
        f"{i} {tag} " + " ".join(words[(i + j) % len(words)] for j in range(40))
        for i in range(count)
    ]


def wait_until(predicate, timeout_s: float = 60.0, every_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError("timed out waiting")


# A bound on a job's run, not a timing assertion: a 1,000-item job of long texts is half a
# minute of forward passes on one slow core, plus a killed stage's restart and redeliveries.
JOB_WAIT_S = 240


def assert_exactly_once(job: Job, count: int) -> list:
    status = job.wait(timeout=JOB_WAIT_S)
    assert status.state == "succeeded", status
    assert (status.total, status.done, status.failed) == (count, count, 0)
    items = list(job.results(page_size=128))
    assert [item.index for item in items] == list(range(count))
    assert all(item.ok for item in items)
    return items


# --- results -------------------------------------------------------------------------------


def test_a_1000_item_job_equals_the_sync_path_in_order(client: Client) -> None:
    batch = texts(1000)
    job = client.submit(iter(batch), model="tiny-classifier")  # any iterable, streamed
    items = assert_exactly_once(job, 1000)
    expected = []
    for start in range(0, len(batch), MAX_ITEMS):
        part = batch[start : start + MAX_ITEMS]
        expected += client.classify(part, model="tiny-classifier", cache="bypass")
    for item, want in zip(items, expected, strict=True):
        assert [s.label for s in item.result] == [s.label for s in want]
        assert [s.score for s in item.result] == pytest.approx([s.score for s in want], abs=1e-5)


def test_embedding_jobs_return_vectors(client: Client) -> None:
    job = client.submit(texts(40), model="minilm-embed")
    items = assert_exactly_once(job, 40)
    vectors = np.stack([item.result for item in items])
    assert vectors.shape == (40, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


def test_a_poison_item_fails_alone_with_its_error(client: Client) -> None:
    batch = texts(70)
    batch[33] = "word " * 500  # over tiny-classifier's 64 tokens, and truncate is off
    batch[50] = "   "
    job = client.submit(batch, model="tiny-classifier")
    status = job.wait(timeout=60)
    assert status.state == "succeeded"  # per-item errors do not fail the job
    assert (status.done, status.failed) == (68, 2)
    items = {item.index: item for item in job.results()}
    assert "502 tokens long" in items[33].error and "truncate" in items[33].error
    assert "texts[" not in items[33].error
    assert "empty" in items[50].error
    assert all(items[i].ok for i in items if i not in (33, 50))


def test_an_item_that_crashes_a_stage_is_dead_lettered_alone(
    client: Client, cluster: Cluster
) -> None:
    batch = texts(40)
    batch[7] = "word " * 150  # 152 tokens: within the model's max_length, beyond its positions
    before = metric(
        cluster, "postprocess", "fmserve_job_items_total", stage="dead-letter", outcome="failed"
    )
    job = client.submit(batch, model="tiny-overreach")
    status = job.wait(timeout=90)
    assert status.state == "succeeded" and (status.done, status.failed) == (39, 1)
    items = {item.index: item for item in job.results()}
    # x-delivery-limit counts redeliveries: the item was tried DELIVERY_LIMIT + 1 times.
    assert items[7].error.startswith(f"dropped after {DELIVERY_LIMIT + 1} deliveries")
    assert all(items[i].ok for i in items if i != 7)
    after = metric(
        cluster, "postprocess", "fmserve_job_items_total", stage="dead-letter", outcome="failed"
    )
    assert after - before == 1


def test_a_job_whose_every_item_fails_is_failed(client: Client) -> None:
    status = client.submit(["word " * 500] * 3, model="tiny-classifier").wait(timeout=60)
    assert status.state == "failed" and "every item failed" in status.error


# --- idempotency, cancel, expiry -----------------------------------------------------------


def test_the_same_idempotency_key_gives_the_same_job(client: Client) -> None:
    key = uuid.uuid4().hex
    first = client.submit(texts(10), model="tiny-classifier", idempotency_key=key)
    again = client.submit(texts(10), model="tiny-classifier", idempotency_key=key)
    assert again.id == first.id
    assert first.wait(timeout=60).total == 10
    assert first.id in [j.id for j in client.jobs()]


def test_cancel_mid_job_stops_it(client: Client, cluster: Cluster) -> None:
    def dropped() -> float:
        return metric(cluster, "inference", "fmserve_job_items_total", outcome="dropped")

    before = dropped()
    job = client.submit(long_texts(3000), model="minilm-embed", priority="low")
    wait_until(lambda: job.status().done > 0)
    assert job.cancel().state == "cancelled"
    # The inference stage notices within job_state_ttl_s and drops the chunks still queued.
    wait_until(lambda: dropped() - before >= 1000, timeout_s=30)
    status = job.status()
    assert status.state == "cancelled" and status.answered < 3000
    with pytest.raises(Conflict, match="already ended"):
        job.cancel()


def test_an_expired_job_says_so(client: Client) -> None:
    job = client.submit(long_texts(3000), model="minilm-embed", timeout_s=1, priority="low")
    status = wait_until(lambda: (s := job.status()).ended and s, timeout_s=30)
    assert status.state == "expired"
    assert "timeout" in status.error


# --- bad input -----------------------------------------------------------------------------


def test_bad_submissions_are_refused_clearly(client: Client) -> None:
    with pytest.raises(NotFound, match="unknown model 'nope'"):
        client.submit(["x"], model="nope")
    with pytest.raises(InvalidInput, match="no items"):
        client.submit([], model="tiny-classifier")
    with pytest.raises(InvalidInput, match="does text-classification, not embedding"):
        client.submit(["x"], model="tiny-classifier", task="embedding")
    with pytest.raises(Overloaded, match=f"at most {MAX_JOB_ITEMS} items"):
        client.submit(texts(MAX_JOB_ITEMS + 1), model="tiny-classifier")


def test_unknown_job_is_not_found_and_a_finished_one_cannot_be_cancelled(client: Client) -> None:
    with pytest.raises(NotFound, match="no job"):
        client.job("0" * 32).status()
    job = client.submit(texts(3), model="tiny-classifier")
    job.wait(timeout=30)
    with pytest.raises(Conflict, match="already ended"):
        job.cancel()


def test_cli_submits_waits_and_writes_results(
    gateway_address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "items.jsonl"
    source.write_text("\n".join([json.dumps({"text": "first"}), json.dumps("second"), ""]))
    out = tmp_path / "results.jsonl"
    args = ["--address", gateway_address, "submit", "--model", "tiny-classifier"]
    assert cli([*args, "--input", str(source), "--output", str(out), "--wait"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["index"] for row in rows] == [0, 1]
    assert rows[0]["result"][0]["label"] in ("negative", "neutral", "positive")
    job_id = capsys.readouterr().out.split()[2]
    assert cli(["--address", gateway_address, "job", job_id]) == 0
    assert "succeeded" in capsys.readouterr().out
    assert cli(["--address", gateway_address, "cancel", job_id]) == 1
    assert "FAILED_PRECONDITION" in capsys.readouterr().err


def test_cli_names_a_malformed_line(
    gateway_address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "fine"}\n"also fine"\n{"text": broken\n')
    args = ["--address", gateway_address, "submit", "--model", "tiny-classifier"]
    assert cli([*args, "--input", str(source)]) == 1
    assert f"{source} line 3: not JSON" in capsys.readouterr().err


# --- faults --------------------------------------------------------------------------------


@pytest.mark.timeout(JOB_WAIT_S + 60)
@pytest.mark.parametrize("stage", ["preprocess", "inference", "postprocess"])
def test_kill_9_of_a_stage_loses_and_duplicates_nothing(
    client: Client, cluster: Cluster, stage: str
) -> None:
    job = client.submit(long_texts(1000), model="minilm-embed")
    wait_until(lambda: job.status().done >= 32)
    replica = cluster.replicas_of[stage][0]
    assert replica.process is not None
    os.kill(replica.process.pid, signal.SIGKILL)  # with chunks in hand, unacked
    replica.process.wait()
    cluster.supervise_once()  # restart it, as `fmserve up` does
    cluster.wait_healthy(replica, time.monotonic() + 90)
    assert_exactly_once(job, 1000)


@pytest.mark.timeout(JOB_WAIT_S + 60)
def test_rabbitmq_dropping_every_connection_mid_job(client: Client) -> None:
    job = client.submit(long_texts(1000), model="minilm-embed")
    wait_until(lambda: job.status().done >= 32)
    subprocess.run(
        ["rabbitmqctl", "close_all_connections", "e2e test: connections dropped"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert_exactly_once(job, 1000)
    after = client.submit(texts(5), model="tiny-classifier")  # the gateway reconnected too
    assert after.wait(timeout=60).state == "succeeded"
