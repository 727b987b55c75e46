"""The export's quality metrics and gate (fmserve/export/quality.py) on made-up outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fmserve.export import AGREEMENT_GATE, COSINE_GATE
from fmserve.export.quality import SAMPLE, Report, agreement, cosine, read_sample

pytestmark = pytest.mark.timeout(10)


def test_the_default_gates_are_the_issues() -> None:
    assert (COSINE_GATE, AGREEMENT_GATE) == (0.99, 0.98)


def test_cosine_compares_pooled_vectors_over_real_tokens_only() -> None:
    reference = np.array([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]], dtype=np.float32)
    candidate = reference.copy()
    candidate[0, 1] = [-50.0, 7.0]  # a padded position: must not count
    candidate[1] = [[1.0, 1.0], [1.0, 1.0]]  # 45 degrees off
    mask = np.array([[1, 0], [1, 1]])
    report = cosine(reference, candidate, mask, "mean", gate=0.99)
    assert report.worst == pytest.approx(np.sqrt(0.5))
    assert report.value == pytest.approx((1 + np.sqrt(0.5)) / 2)
    assert (report.metric, report.texts, report.passed) == ("cosine", 2, False)


def test_cls_pooling_compares_the_first_token() -> None:
    reference = np.array([[[1.0, 0.0], [0.0, 1.0]]], dtype=np.float32)
    candidate = np.array([[[2.0, 0.0], [1.0, 0.0]]], dtype=np.float32)
    report = cosine(reference, candidate, np.ones((1, 2)), "cls", gate=0.99)
    assert (report.value, report.passed) == (pytest.approx(1.0), True)


def test_agreement_of_sequence_logits_is_per_text() -> None:
    reference = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    candidate = np.array([[0.2, 0.8], [0.7, 0.3], [0.6, 0.4], [0.9, 0.1]])  # the third flips
    report = agreement(reference, candidate, np.ones((4, 3)), gate=0.98)
    assert (report.value, report.worst, report.passed) == (0.75, 0.0, False)


def test_agreement_of_token_logits_counts_real_tokens() -> None:
    reference = np.zeros((2, 3, 2))
    reference[..., 0] = 1.0
    candidate = reference.copy()
    candidate[0, 2] = [0.0, 1.0]  # padding: ignored
    candidate[1, 1] = [0.0, 1.0]  # a real token that flips
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    report = agreement(reference, candidate, mask, gate=0.5)
    assert report.value == pytest.approx(4 / 5)
    assert report.worst == pytest.approx(2 / 3)
    assert report.passed


def test_the_gate_is_inclusive_and_reported() -> None:
    report = Report("cosine", 0.99, 0.98, 32, gate=0.99)
    assert report.passed
    assert report.lines()[-1] == "  gate cosine >= 0.99: passes"
    assert report.as_dict()["passed"] is True
    assert "FAILS" in Report("agreement", 0.5, 0.0, 2, gate=0.98).lines()[-1]


def test_the_sample_is_built_in_or_one_text_per_line(tmp_path: Path) -> None:
    assert read_sample(None) == list(SAMPLE) and len(SAMPLE) >= 32
    path = tmp_path / "texts.txt"
    path.write_text("first text\n\n  second text  \n")
    assert read_sample(path) == ["first text", "second text"]
    path.write_text("\n \n")
    with pytest.raises(ValueError, match="has no texts"):
        read_sample(path)
