"""RpcMetrics keeps its `model` label bounded whatever names clients send."""

from __future__ import annotations

import uuid

import pytest

from fmserve.core import metrics
from fmserve.core.metrics import UNKNOWN_MODEL, RpcMetrics

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def rpc() -> RpcMetrics:
    return RpcMetrics(f"labels_{uuid.uuid4().hex[:8]}")


def test_a_name_is_a_label_once_it_answered_ok(rpc: RpcMetrics) -> None:
    assert rpc.model_label("typo", "NOT_FOUND") == UNKNOWN_MODEL
    assert rpc.model_label("real", "OK") == "real"
    assert rpc.model_label("real", "INVALID_ARGUMENT") == "real"
    assert rpc.model_label("typo", "NOT_FOUND") == UNKNOWN_MODEL


def test_a_call_without_a_model_is_dash(rpc: RpcMetrics) -> None:
    assert rpc.model_label("", "OK") == "-"


def test_labels_stop_growing_at_the_bound(rpc: RpcMetrics, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "MAX_MODEL_LABELS", 3)
    labels = [rpc.model_label(f"m{i}", "OK") for i in range(5)]
    assert labels == ["m0", "m1", "m2", UNKNOWN_MODEL, UNKNOWN_MODEL]


def test_a_thousand_made_up_names_add_no_series(rpc: RpcMetrics) -> None:
    for i in range(1000):
        rpc.observe("Infer", f"made-up-{i}" * 10, "NOT_FOUND", 0.001)
    series = {s.labels["model"] for m in rpc.requests.collect() for s in m.samples}
    assert series == {UNKNOWN_MODEL}
