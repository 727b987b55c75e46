"""`fmserve export`'s refusals, which come before any model is loaded or file written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fmserve.cli import main as cli

pytestmark = pytest.mark.timeout(30)


def write_model(root: Path, name: str, task: str) -> Path:
    folder = root / name
    (folder / "1").mkdir(parents=True)
    config = {"id2label": {"0": "a", "1": "b"}, "image_size": 32}
    (folder / "1" / "config.json").write_text(json.dumps(config))
    (folder / "model.toml").write_text(f'task = "{task}"\n')
    return folder


def test_the_repository_is_the_services_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_model(tmp_path, "other", "text-classification")
    monkeypatch.setenv("FMSERVE_MODEL_REPOSITORY", str(tmp_path))
    assert cli(["export", "--model", "missing", "--format", "onnx"]) == 1
    assert "unknown model 'missing'; this cluster serves: other" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("task", "version", "message"),
    [
        ("text-generation", "", "text-generation models are not exported"),
        ("image-classification", "", "image-classification models are not exported"),
        ("text-classification", "1", "already has version 1"),
        ("text-classification", "v2", "--version 'v2': version folders are numbers"),
    ],
)
def test_an_export_that_cannot_be_written_is_refused_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], task: str, version: str, message: str
) -> None:
    folder = write_model(tmp_path, "m", task)
    args = ["export", "--model", "m", "--format", "onnx", "--repository", str(tmp_path)]
    assert cli([*args, "--version", version]) == 1
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["1", "model.toml"]
