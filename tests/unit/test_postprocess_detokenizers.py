"""The postprocess service's detokenizers, loaded from the test repository's tiny LMs."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from fmserve.core.repository import ModelRepository
from fmserve.errors import WrongTask
from services.postprocess.detokenizers import Detokenizers


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
async def test_a_stream_of_ids_reads_as_the_models_decode(model_repository: Path, model):
    reference = AutoTokenizer.from_pretrained(model_repository / model / "1")
    ids = reference("naïve café: 東京 ok 😀 def x(): return 42")["input_ids"]
    detokenizers = Detokenizers(ModelRepository(model_repository))

    detok = await detokenizers.open(model, "", stop=["return"])
    deltas = [detok.add([i]).text for i in ids]

    assert detok.stopped
    expected = reference.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) == expected[: expected.index("return")]


async def test_an_encoder_has_no_detokenizer(model_repository: Path):
    with pytest.raises(WrongTask, match="not text-generation"):
        await Detokenizers(ModelRepository(model_repository)).open("minilm-embed", "", ())
