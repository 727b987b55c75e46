"""Text classification: one row of logits per text → its labels with probabilities, best first."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.postprocess.results import Classification, LabelScore


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, in float64. Each row's maximum is subtracted first, so
    exp never overflows however large the logits; the result is unchanged by the shift."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def top_labels(probs: np.ndarray, top_k: int = 0) -> np.ndarray:
    """Column indices of each row, highest probability first (ties keep label order), cut to
    `top_k` columns when it is positive."""
    order = np.argsort(-probs, axis=-1, kind="stable")
    return order[:, :top_k] if top_k > 0 else order


def classify(logits: np.ndarray, labels: Sequence[str], top_k: int = 0) -> list[Classification]:
    """One classification per row of `logits` [texts, labels]."""
    probs = softmax(logits)
    order = top_labels(probs, top_k)
    scores = np.take_along_axis(probs, order, axis=-1).tolist()
    return [
        Classification([LabelScore(labels[j], s) for j, s in zip(row, row_scores, strict=True)])
        for row, row_scores in zip(order.tolist(), scores, strict=True)
    ]
