"""The postprocessor: outputs checked against the model's config, one result per text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fmserve.core.repository import ModelRepository
from fmserve.core.tasks import TaskName
from fmserve.errors import InvalidInput, ModelNotFound, WrongTask
from services.postprocess.postprocessor import ModelOutputs, Postprocessor
from services.postprocess.results import Classification, Embedding, Entities, Entity

NER_TEXTS = ["Anna lives in Rome", "ok"]
# [CLS] anna lives in rome [SEP] | [CLS] ok [SEP]
NER_OFFSETS = [(0, 0), (0, 4), (5, 10), (11, 13), (14, 18), (0, 0), (0, 0), (0, 2), (0, 0)]
NER_TAGS = [0, 1, 0, 0, 3, 0, 0, 0, 0]  # O B-PER O O B-LOC O O O O


@pytest.fixture(scope="module")
async def postprocessor(model_repository: Path):
    postprocessor = Postprocessor(ModelRepository(model_repository), offload_min_rows=1000)
    yield postprocessor
    await postprocessor.stop()


def _ner(**changes) -> ModelOutputs:
    logits = np.full((len(NER_TAGS), 5), -4.0, dtype=np.float32)
    logits[np.arange(len(NER_TAGS)), NER_TAGS] = 4.0
    fields = {
        "model": "tiny-ner",
        "task": TaskName.TOKEN_CLASSIFICATION,
        "output": logits,
        "texts": NER_TEXTS,
        "lengths": np.array([6, 3], dtype=np.int32),
        "offsets": np.array(NER_OFFSETS, dtype=np.int32),
    }
    return ModelOutputs(**(fields | changes))


def _logits(rows: int, columns: int = 3) -> np.ndarray:
    return np.arange(rows * columns, dtype=np.float32).reshape(rows, columns)


async def test_embeddings_pass_through_unchanged(postprocessor):
    vectors = np.array([[3.0, 4.0], [0.6, 0.8]], dtype=np.float32)

    results = await postprocessor.run(ModelOutputs("minilm-embed", vectors, texts=["a", "b"]))

    assert all(isinstance(r, Embedding) for r in results)
    np.testing.assert_array_equal(np.stack([r.values for r in results]), vectors)


async def test_classification_uses_the_model_labels(postprocessor):
    logits = np.array([[0.0, 0.0, 5.0], [5.0, 0.0, 0.0]], dtype=np.float32)

    results = await postprocessor.run(ModelOutputs("tiny-classifier", logits, top_k=1))

    assert all(isinstance(r, Classification) for r in results)
    assert [r.labels[0].label for r in results] == ["positive", "negative"]


async def test_zero_shot_labels_come_from_prototypes(postprocessor):
    logits = np.array([[0.0, 9.0, 0.0]], dtype=np.float32)  # positive, negative, neutral

    (result,) = await postprocessor.run(ModelOutputs("minilm-sentiment", logits))

    assert [s.label for s in result.labels] == ["negative", "positive", "neutral"]


async def test_entities_of_each_text(postprocessor):
    results = await postprocessor.run(_ner())

    assert all(isinstance(r, Entities) for r in results)
    first, second = results
    assert [(e.label, e.text, e.start, e.end) for e in first.entities] == [
        ("PER", "Anna", 0, 4),
        ("LOC", "Rome", 14, 18),
    ]
    assert second.entities == []


async def test_big_batches_run_in_a_thread_with_the_same_answer(model_repository):
    inline = Postprocessor(ModelRepository(model_repository), offload_min_rows=10**9)
    threaded = Postprocessor(ModelRepository(model_repository), offload_min_rows=0)
    try:
        assert await inline.run(_ner()) == await threaded.run(_ner())
    finally:
        await inline.stop()
        await threaded.stop()


async def test_the_model_task_is_used_when_none_is_given(postprocessor):
    results = await postprocessor.run(_ner(task=None))

    assert isinstance(results[0].entities[0], Entity)


@pytest.mark.parametrize(
    ("outputs", "error", "fragment"),
    [
        (ModelOutputs("nope", _logits(1)), ModelNotFound, "unknown model 'nope'"),
        (ModelOutputs("tiny-classifier", _logits(1), version="9"), ModelNotFound, "version '9'"),
        (
            ModelOutputs("tiny-classifier", _logits(1), task=TaskName.EMBEDDING),
            WrongTask,
            "does text-classification, not embedding",
        ),
        (
            ModelOutputs("tiny-classifier", _logits(3), texts=["a", "b"]),
            InvalidInput,
            "3 rows but 2 texts",
        ),
        (ModelOutputs("tiny-classifier", _logits(2, 4)), InvalidInput, "4 columns but model"),
        (ModelOutputs("tiny-classifier", _logits(2), top_k=-1), InvalidInput, "top_k is -1"),
        (
            ModelOutputs("tiny-classifier", np.zeros((2, 3), dtype=np.int64)),
            InvalidInput,
            "must be FP32",
        ),
        (
            ModelOutputs("minilm-embed", np.zeros(4, dtype=np.float32)),
            InvalidInput,
            "must have 2 dimensions",
        ),
        (
            ModelOutputs("tiny-classifier", np.array([[0, np.nan, 1]], dtype=np.float32)),
            InvalidInput,
            "NaN or infinite",
        ),
        (_ner(texts=[]), InvalidInput, "needs the texts"),
        (_ner(offsets=None), InvalidInput, "needs the lengths and offsets"),
        (_ner(lengths=np.array([9], dtype=np.int32)), InvalidInput, r"expected \[2\]"),
        (_ner(lengths=np.array([5, 3], dtype=np.int32)), InvalidInput, "sum to 8 tokens"),
        (_ner(lengths=np.array([10, -1], dtype=np.int32)), InvalidInput, "0 or more"),
        (_ner(offsets=np.zeros((9, 3), dtype=np.int32)), InvalidInput, r"expected \[9, 2\]"),
        (_ner(offsets=np.zeros((9, 2), dtype=np.float32)), InvalidInput, "must be INT32"),
        (
            _ner(offsets=np.array([*NER_OFFSETS[:7], (0, 5), (0, 0)], dtype=np.int32)),
            InvalidInput,
            r"token 7 \(0, 5\) fall outside texts\[1\] \(2 characters\)",
        ),
        (_ner(output=_logits(9, 3)), InvalidInput, "3 columns but model 'tiny-ner' has 5"),
    ],
)
async def test_outputs_that_do_not_fit_are_refused(postprocessor, outputs, error, fragment):
    with pytest.raises(error, match=fragment):
        await postprocessor.run(outputs)
