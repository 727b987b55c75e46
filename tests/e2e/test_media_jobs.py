"""Batch jobs of media end to end (the session's cluster, real RabbitMQ and Redis): images and
audio clips through the job path, each item's result held to the sync path's for the same item,
and a bad item failing alone."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from fmserve import Client
from fmserve.cli import main as cli
from fmserve.client import Job
from fmserve.errors import InvalidInput, from_rpc_error
from fmserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.e2e.conftest import MAX_ITEMS, MAX_JOB_CHUNK_BYTES
from tests.images import drawn, encoded

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

JOB_WAIT_S = 180
RATE = 16_000
CORRUPT_PNG = b"\x89PNG\r\n\x1a\n" + bytes(300)


@pytest.fixture(scope="module")
def client(gateway_address: str) -> Client:
    with Client(gateway_address, timeout=60) as client:
        yield client


def images(count: int) -> list[bytes]:
    """Distinct images of assorted sizes and formats."""
    formats = [("PNG", {}), ("JPEG", {"quality": 90}), ("WEBP", {"lossless": True})]
    out = []
    for i in range(count):
        form, options = formats[i % len(formats)]
        out.append(encoded(drawn(24 + i % 50, 20 + i % 37, seed=1000 + i), form, **options))
    return out


def clips(count: int) -> list[np.ndarray]:
    """Noise clips of different lengths, so that a chunk pads them and cuts their frames."""
    rng = np.random.default_rng(5)
    return [rng.normal(0, 0.3, 8_000 + 3_001 * i).astype(np.float32) for i in range(count)]


def succeeded(job: Job, count: int) -> list:
    status = job.wait(timeout=JOB_WAIT_S)
    assert status.state == "succeeded", status
    assert (status.total, status.done, status.failed) == (count, count, 0)
    items = list(job.results(page_size=128))
    assert [item.index for item in items] == list(range(count))
    return [item.result for item in items]


def assert_same_labels(got: list, want: list) -> None:
    assert len(got) == len(want)
    for job_labels, sync_labels in zip(got, want, strict=True):
        assert [s.label for s in job_labels] == [s.label for s in sync_labels]
        assert [s.score for s in job_labels] == pytest.approx(
            [s.score for s in sync_labels], abs=1e-5
        )


def test_a_200_image_job_equals_the_sync_path(client: Client) -> None:
    batch = images(200)
    job = client.submit_media(iter(batch), model="tiny-vit")  # any iterable, streamed
    results = succeeded(job, 200)
    expected = []
    for start in range(0, len(batch), MAX_ITEMS):
        part = batch[start : start + MAX_ITEMS]
        expected += client.classify_images(part, "tiny-vit", cache="bypass")
    assert_same_labels(results, expected)
    assert len({tuple(s.score for s in r) for r in results}) > 1  # the images differ


def test_an_image_embedding_job_equals_the_sync_path(client: Client) -> None:
    batch = images(12)
    results = succeeded(client.submit_media(batch, model="tiny-clip"), 12)
    expected = client.embed_images(batch, "tiny-clip", cache="bypass")
    np.testing.assert_allclose(np.stack(results), expected, atol=1e-5)


def test_a_speech_recognition_job_equals_the_sync_path(client: Client) -> None:
    batch = clips(9)  # the CTC model's 30 s clips: 6 per chunk, so two chunks
    job = client.submit_media(batch, model="tiny-wav2vec2-ctc", sample_rate=RATE)
    results = succeeded(job, 9)
    expected = client.transcribe(batch, "tiny-wav2vec2-ctc", sample_rate=RATE, cache="bypass")
    assert [r.text for r in results] == [e.text for e in expected]
    for got, want in zip(results, expected, strict=True):
        assert [w.word for w in got.words] == [w.word for w in want.words]
        times = [t for w in got.words for t in (w.start_s, w.end_s)]
        assert times == pytest.approx([t for w in want.words for t in (w.start_s, w.end_s)])
    assert any(r.text for r in results)


def test_an_audio_classification_job_equals_the_sync_path(client: Client) -> None:
    batch = clips(5)
    job = client.submit_media(batch, model="tiny-audio-classifier", sample_rate=RATE)
    results = succeeded(job, 5)
    expected = client.classify_audio(
        batch, "tiny-audio-classifier", sample_rate=RATE, cache="bypass"
    )
    assert_same_labels(results, expected)


def test_a_corrupt_image_fails_alone_with_its_problem(client: Client) -> None:
    batch = images(40)
    batch[7] = CORRUPT_PNG
    batch[30] = b""  # empty: failed by the gateway before it is queued
    status = client.submit_media(batch, model="tiny-vit").wait(timeout=JOB_WAIT_S)
    assert status.state == "succeeded"  # per-item errors do not fail the job
    assert (status.total, status.done, status.failed) == (40, 38, 2)
    items = {item.index: item for item in client.job(status.id).results()}
    assert items[7].error.startswith("the media item is not a readable image/png image")
    assert "media[" not in items[7].error
    assert items[30].error.startswith("the media item is empty")
    good = [i for i in range(40) if i not in (7, 30)]
    assert all(items[i].ok for i in good)
    expected = client.classify_images([batch[i] for i in good], "tiny-vit", cache="bypass")
    assert_same_labels([items[i].result for i in good], expected)


def test_wrong_kinds_of_job_are_refused_clearly(client: Client, gateway_address: str) -> None:
    with pytest.raises(InvalidInput, match="takes images: send them as media"):
        client.submit(["a cat"], model="tiny-vit")
    with pytest.raises(InvalidInput, match="takes texts, not media"):
        client.submit_media(images(1), model="tiny-classifier")
    both = gateway_pb2.JobItems(texts=["a cat"], media=[common_pb2.Media(data=images(1)[0])])
    with pytest.raises(InvalidInput, match="texts or media, not both"):
        _raw_submit(gateway_address, "tiny-clip", [both])
    later_texts = [
        gateway_pb2.JobItems(media=[common_pb2.Media(mime_type="image/png", data=images(1)[0])]),
        gateway_pb2.JobItems(texts=["a cat"]),
    ]
    with pytest.raises(InvalidInput, match="texts or media, not both"):
        _raw_submit(gateway_address, "tiny-clip", later_texts)


def test_an_item_over_the_chunk_limit_refuses_the_job(client: Client) -> None:
    huge = b"\x89PNG\r\n\x1a\n" + bytes(MAX_JOB_CHUNK_BYTES)
    size = len(huge)
    message = rf"media item 2 is {size} bytes; a job's item may be at most {MAX_JOB_CHUNK_BYTES}"
    with pytest.raises(InvalidInput, match=message):
        client.submit_media([*images(2), huge], model="tiny-vit")


def test_big_images_travel_in_chunks_bounded_by_bytes(client: Client) -> None:
    """Noise images of about 0.8 MB, over a third of the cluster's 2 MiB chunk limit each, so
    the job's chunks split by bytes (whose sizes test_gateway_job_limits.py checks): the answers
    still equal the sync path's."""
    rng = np.random.default_rng(3)
    noise = [rng.integers(0, 256, (480, 560, 3), dtype=np.uint8) for _ in range(5)]
    batch = [encoded(Image.fromarray(pixels), "PNG") for pixels in noise]
    assert all(700_000 < len(b) < MAX_JOB_CHUNK_BYTES // 2 for b in batch)
    results = succeeded(client.submit_media(batch, model="tiny-vit"), 5)
    assert_same_labels(results, client.classify_images(batch, "tiny-vit", cache="bypass"))


def test_a_text_job_on_clip_embeds_its_texts(client: Client) -> None:
    texts = ["a cat", "a dog on a sofa", "a red car"]
    results = succeeded(client.submit(texts, model="tiny-clip"), 3)
    expected = client.embed(texts, "tiny-clip", cache="bypass")
    np.testing.assert_allclose(np.stack(results), expected, atol=1e-5)


def _raw_submit(address: str, model: str, items: list[gateway_pb2.JobItems]) -> None:
    header = gateway_pb2.SubmitJobRequest(header=gateway_pb2.JobHeader(model=model))
    requests = [header, *(gateway_pb2.SubmitJobRequest(items=i) for i in items)]
    with grpc.insecure_channel(address) as channel:
        try:
            gateway_pb2_grpc.GatewayStub(channel).SubmitJob(iter(requests), timeout=30)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None


def test_the_cli_submits_files_and_writes_their_results(
    client: Client, gateway_address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = images(3)
    for i, data in enumerate(batch):
        (tmp_path / f"{i}.png").write_bytes(data)
    source = tmp_path / "images.jsonl"
    lines = [{"file": "0.png"}, {"file": "1.png"}, {"file": str(tmp_path / "2.png")}]
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "results.jsonl"
    args = ["--address", gateway_address, "submit", "--model", "tiny-vit"]

    assert cli([*args, "--input", str(source), "--output", str(out), "--wait"]) == 0

    assert "(3 items)" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["index"] for row in rows] == [0, 1, 2]
    expected = client.classify_images(batch, "tiny-vit", cache="bypass")
    assert [[s["label"] for s in row["result"]] for row in rows] == [
        [s.label for s in labels] for labels in expected
    ]


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        ([{"file": "a.png"}, {"text": "a text"}], "line 2: a job is texts or files, not both"),
        ([{"text": "a text"}, {"file": "a.png"}], "line 2: a job is texts or files, not both"),
        ([{"file": "missing.png"}], "line 1: no file at"),
    ],
)
def test_the_cli_refuses_a_file_job_it_cannot_send(
    gateway_address: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    lines: list[dict[str, str]],
    problem: str,
) -> None:
    (tmp_path / "a.png").write_bytes(images(1)[0])
    source = tmp_path / "job.jsonl"
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    args = ["--address", gateway_address, "submit", "--model", "tiny-vit"]

    assert cli([*args, "--input", str(source)]) == 1

    assert f"{source} {problem}" in capsys.readouterr().err
