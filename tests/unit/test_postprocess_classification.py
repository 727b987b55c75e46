"""Softmax and top-k of the postprocess service: pure numpy, known answers."""

from __future__ import annotations

import numpy as np
import pytest

from services.postprocess.classification import classify, softmax, top_labels

LABELS = ("negative", "neutral", "positive")


def test_softmax_matches_the_definition():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=np.float32)

    probs = softmax(logits)

    e = np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(probs[0], e / e.sum(), rtol=1e-12)
    np.testing.assert_allclose(probs[1], [1 / 3] * 3, rtol=1e-12)


def test_softmax_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 1001.0, -1000.0], [-3e38, -3e38, -3e38]], dtype=np.float32)

    probs = softmax(logits)

    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=-1), [1.0, 1.0])
    e = np.exp([-1.0, 0.0])
    np.testing.assert_allclose(probs[0, :2], e / e.sum(), rtol=1e-9)
    assert probs[0, 2] == pytest.approx(0.0, abs=1e-300)


def test_top_labels_best_first_and_ties_keep_label_order():
    probs = np.array([[0.2, 0.5, 0.3], [0.4, 0.2, 0.4]])

    assert top_labels(probs).tolist() == [[1, 2, 0], [0, 2, 1]]
    assert top_labels(probs, top_k=1).tolist() == [[1], [0]]
    assert top_labels(probs, top_k=10).tolist() == [[1, 2, 0], [0, 2, 1]]


def test_classify_gives_labels_with_probabilities_best_first():
    logits = np.log(np.array([[0.1, 0.3, 0.6], [0.7, 0.2, 0.1]], dtype=np.float32))

    results = classify(logits, LABELS, top_k=2)

    assert [[s.label for s in r.labels] for r in results] == [
        ["positive", "neutral"],
        ["negative", "neutral"],
    ]
    assert [s.score for s in results[0].labels] == pytest.approx([0.6, 0.3], rel=1e-6)
    assert [s.score for s in results[1].labels] == pytest.approx([0.7, 0.2], rel=1e-6)


def test_classify_with_top_k_zero_keeps_every_label():
    logits = np.array([[0.0, 1.0, 2.0]], dtype=np.float32)

    (result,) = classify(logits, LABELS, top_k=0)

    assert [s.label for s in result.labels] == ["positive", "neutral", "negative"]
    assert sum(s.score for s in result.labels) == pytest.approx(1.0)


def test_classify_an_empty_batch():
    assert classify(np.zeros((0, 3), dtype=np.float32), LABELS) == []
