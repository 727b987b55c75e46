"""The preprocess service's tokenizers: real MiniLM tokenizer files from the test repository."""

from __future__ import annotations

import asyncio
import time
from itertools import chain
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY
from transformers import AutoTokenizer

from fmserve.core.repository import ModelConfig, ModelRepository
from fmserve.errors import FmserveError, InputTooLong, InvalidInput, ModelNotFound
from fmserve.v1 import jobs_pb2
from services.preprocess.tokenizers import Tokenizers
from services.preprocess.worker import text_name

TEXTS = ["Wolfgang Mozart was born in Salzburg.", "Hello world", "naïve café — 東京"]
CLS, SEP = 101, 102


@pytest.fixture(scope="module")
async def tokenizers(model_repository: Path):
    tokenizers = Tokenizers(ModelRepository(model_repository), threads=1)
    yield tokenizers
    await tokenizers.stop()


@pytest.fixture(scope="module")
def reference(model_repository: Path):
    return AutoTokenizer.from_pretrained(model_repository / "tiny-ner" / "1", local_files_only=True)


def _loads(model: str, outcome: str = "ok") -> float:
    labels = {"model": model, "outcome": outcome}
    return REGISTRY.get_sample_value("fmserve_preprocess_tokenizer_loads_total", labels) or 0.0


async def test_ids_lengths_and_offsets_match_the_tokenizer(tokenizers, reference):
    tokenized = await tokenizers.tokenize("tiny-ner", "", TEXTS, offsets=True)

    expected = reference(TEXTS, return_offsets_mapping=True)
    assert tokenized.input_ids.dtype == np.int64
    assert tokenized.input_ids.tolist() == list(chain.from_iterable(expected["input_ids"]))
    assert tokenized.lengths.dtype == np.int32
    assert tokenized.lengths.tolist() == [len(ids) for ids in expected["input_ids"]]
    assert tokenized.offsets.dtype == np.int32
    assert tokenized.offsets.tolist() == [
        list(p) for p in chain.from_iterable(expected["offset_mapping"])
    ]


async def test_special_tokens_are_included_with_empty_offsets(tokenizers):
    tokenized = await tokenizers.tokenize("tiny-ner", "1", ["Hello world"], offsets=True)

    assert tokenized.input_ids.tolist() == [CLS, 7592, 2088, SEP]
    assert tokenized.offsets.tolist() == [[0, 0], [0, 5], [6, 11], [0, 0]]


async def test_offsets_only_when_asked(tokenizers):
    tokenized = await tokenizers.tokenize("minilm-embed", "", ["Hello world"])

    assert tokenized.offsets is None


async def test_a_text_over_the_limit_is_refused_naming_it(tokenizers):
    long_text = "word " * 100  # 102 tokens; tiny-classifier takes 64

    with pytest.raises(InputTooLong) as caught:
        await tokenizers.tokenize("tiny-classifier", "", ["short", long_text, long_text])

    message = caught.value.message
    assert "texts[1] is 102 tokens long (and 1 more texts)" in message
    assert "at most 64" in message
    assert "truncate" in message


async def test_a_job_item_is_named_the_text(tokenizers):
    # A job's owner reads the error as the item's answer: "texts[0]" would mean nothing.
    item = jobs_pb2.JobChunk(indexes=[33], texts=["word " * 100])
    with pytest.raises(InputTooLong, match=r"^the text is 102 tokens long; model"):
        await tokenizers.tokenize("tiny-classifier", "", item.texts, name=text_name(item))
    with pytest.raises(InvalidInput, match=r"^the text is empty"):
        await tokenizers.tokenize("tiny-ner", "", [" "], name=text_name(item))


def test_a_chunk_of_several_names_its_texts_by_position():
    chunk = jobs_pb2.JobChunk(indexes=[4, 5], texts=["a", "b"])
    assert text_name(chunk)(1) == "texts[1]"


async def test_truncate_cuts_to_the_limit_keeping_special_tokens(tokenizers):
    long_text = "word " * 100

    tokenized = await tokenizers.tokenize(
        "tiny-classifier", "", ["short", long_text], truncate=True
    )

    assert tokenized.lengths.tolist() == [3, 64]
    ids = tokenized.input_ids[3:]
    assert ids[0] == CLS and ids[-1] == SEP and len(ids) == 64


async def test_a_text_exactly_at_the_limit_passes(tokenizers):
    text = "word " * 62  # 62 words + [CLS] + [SEP] = 64

    tokenized = await tokenizers.tokenize("tiny-classifier", "", [text])

    assert tokenized.lengths.tolist() == [64]


@pytest.mark.parametrize("truncate", [False, True])
async def test_the_tokenizer_files_own_128_token_settings_never_apply(tokenizers, truncate):
    # MiniLM's tokenizer.json truncates and pads to 128; the model takes 256 (model.toml)
    long_text = " ".join(["serving"] * 198)  # 198 words + [CLS] + [SEP] = 200 tokens
    config = tokenizers.repository.get("minilm-embed")
    tokenized = await tokenizers.tokenize("minilm-embed", "", [long_text, "hi"], truncate)

    assert config.max_length == 256
    assert tokenized.lengths.tolist() == [200, 3]  # neither cut at 128 nor padded to it
    assert tokenized.total_tokens == 203 and 0 not in tokenized.input_ids  # no [PAD]


@pytest.mark.parametrize(
    ("texts", "fragment"),
    [([], "texts is empty"), (["fine", ""], "texts[1]"), (["fine", "ok", " \n\t"], "texts[2]")],
)
async def test_empty_or_blank_texts_are_refused_naming_the_index(tokenizers, texts, fragment):
    with pytest.raises(InvalidInput, match=fragment.replace("[", r"\[")):
        await tokenizers.tokenize("tiny-ner", "", texts)


async def test_unknown_model_and_version_are_not_found(tokenizers):
    with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
        await tokenizers.tokenize("nope", "", ["hi"])
    with pytest.raises(ModelNotFound, match="no version '7'"):
        await tokenizers.tokenize("tiny-classifier", "7", ["hi"])


async def test_concurrent_first_requests_load_the_tokenizer_once(model_repository):
    tokenizers = Tokenizers(ModelRepository(model_repository), threads=2)
    before = _loads("minilm-sentiment")
    try:
        results = await asyncio.gather(
            *(tokenizers.tokenize("minilm-sentiment", "", [f"text {i}"]) for i in range(8))
        )
        config = tokenizers.repository.get("minilm-sentiment")
        first = await tokenizers.get(config, "1")
        assert first is await tokenizers.get(config, "1")
    finally:
        await tokenizers.stop()

    assert _loads("minilm-sentiment") - before == 1
    assert [r.lengths.tolist() for r in results] == [[4]] * 8


async def test_versions_have_their_own_tokenizers(tokenizers):
    config = tokenizers.repository.get("tiny-classifier")

    assert await tokenizers.get(config, "1") is not await tokenizers.get(config, "2")


async def test_a_failed_load_is_reported_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    folder = tmp_path / "broken" / "1"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # a model without tokenizer files
    (tmp_path / "broken" / "model.toml").write_text('task = "embedding"\n')
    tokenizers = Tokenizers(ModelRepository(tmp_path), threads=1)
    before = _loads("broken", "error")
    try:
        for _ in range(2):
            with pytest.raises(FmserveError, match="tokenizer of model 'broken' version 1") as e:
                await tokenizers.tokenize("broken", "", ["hi"])
            # The message reaches clients: it names the model, never the server's folders.
            assert str(tmp_path) not in e.value.message
    finally:
        await tokenizers.stop()

    assert _loads("broken", "error") - before == 2
    assert str(folder) in caplog.text  # the operator finds the folder in the log


async def test_tokens_per_request_are_counted(tokenizers):
    labels = {"model": "tiny-ner"}
    name = "fmserve_preprocess_request_tokens_sum"
    before = REGISTRY.get_sample_value(name, labels) or 0.0

    await tokenizers.tokenize("tiny-ner", "", ["Hello world", "Hello"])

    assert REGISTRY.get_sample_value(name, labels) - before == 7


async def test_finding_a_models_files_runs_off_the_event_loop(
    model_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """For a GGUF source, the first `files()` converts it (a minute, once): the event loop must
    keep serving other calls meanwhile."""
    slow_s = 0.5
    found = ModelConfig.files

    def slow_files(self: ModelConfig, version: str = "") -> Path:
        time.sleep(slow_s)
        return found(self, version)

    monkeypatch.setattr(ModelConfig, "files", slow_files)
    own = Tokenizers(ModelRepository(model_repository), threads=1)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    try:
        await own.tokenize("minilm-embed", "", ["a text"])
    finally:
        ticker.cancel()
        await own.stop()
    assert ticks >= slow_s / 0.01 / 2, f"the event loop ran {ticks} times in {slow_s} s"
