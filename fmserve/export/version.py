"""Writing an exported version: model.onnx (fp32, or int8) with the source version's config and
tokenizer files, in a staging folder inside the model's folder; measured against the torch fp32
version; moved into place as version N only if it passes the gate; then model.toml gets the
version's `[versions.N.runtime]` table (onnxruntime), so the repository serves it as is."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoTokenizer

from fmserve.core.repository import CONFIG_FILE, ModelConfig, ModelRepository, version_order
from fmserve.core.tasks import TaskName
from fmserve.export import AGREEMENT_GATE, COSINE_GATE, convert, quality

REPORT_FILE = "quality.json"
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".h5", ".msgpack")


class ExportRefused(Exception):
    """The export cannot or must not be written; the message says why."""


@dataclass(frozen=True)
class ExportRequest:
    model: str
    repository: Path
    quantize: str = ""
    """"" (fp32) or "int8"."""
    version: str = ""
    """"" picks the next number."""
    sample: Path | None = None
    cosine_gate: float = COSINE_GATE
    agreement_gate: float = AGREEMENT_GATE


def export_version(request: ExportRequest, say: Callable[[str], None]) -> str:
    """Export, measure and write the new version; its name. ExportRefused when it cannot be
    exported or falls below the gate (nothing is written then)."""
    config = ModelRepository(request.repository).get(request.model)
    if config.task is TaskName.TEXT_GENERATION or config.task.takes_images:
        raise ExportRefused(
            f"{config.task.value} models are not exported: onnxruntime serves text encoders"
        )
    source = _source_version(config)
    target = _target_version(config, request.version)
    folder = request.repository / request.model
    staging = folder / f".export-{target}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        report = _write(config, source, staging, request, say)
        for line in report.lines():
            say(line)
        if not report.passed:
            raise ExportRefused(
                f"version {target} not written: its {report.metric} {report.value:.6f} is below "
                f"the gate {report.gate} (change it with --min-{report.metric})"
            )
        staging.rename(folder / target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _declare(folder / CONFIG_FILE, target, request.quantize or "fp32")
    return target


def _write(
    config: ModelConfig,
    source: str,
    staging: Path,
    request: ExportRequest,
    say: Callable[[str], None],
) -> quality.Report:
    files = config.files(source)
    hidden = bool(config.prototypes) or config.task is TaskName.EMBEDDING
    graph = convert.load_graph(files, config.task, hidden)
    model = staging / convert.MODEL_FILE
    say(f"exporting {config.name} version {source} to ONNX (torch.onnx, dynamo)")
    if request.quantize:
        fp32 = staging / "fp32.onnx"
        convert.export(graph, fp32)
        say("quantising to int8 (onnxruntime dynamic quantisation)")
        convert.quantize_int8(fp32, model)
        fp32.unlink()
    else:
        convert.export(graph, model)
    for path in files.iterdir():
        if path.is_file() and path.suffix not in _WEIGHTS:
            shutil.copy(path, staging / path.name)
    report = _measure(config, graph, model, files, request)
    details = {
        "source_version": source,
        "format": "onnx",
        "precision": request.quantize or "fp32",
        "exporter": f"torch.onnx dynamo (torch {torch.__version__})",
        "onnxruntime": ort.__version__,
        **report.as_dict(),
    }
    (staging / REPORT_FILE).write_text(json.dumps(details, indent=2) + "\n")
    return report


def _measure(
    config: ModelConfig, graph: convert.Graph, model: Path, files: Path, request: ExportRequest
) -> quality.Report:
    texts = quality.read_sample(request.sample)
    tokenizer: Any = AutoTokenizer.from_pretrained(
        files, local_files_only=True, trust_remote_code=False
    )
    encoded = tokenizer(
        texts, padding=True, truncation=True, max_length=config.max_length, return_tensors="np"
    )
    ids = encoded["input_ids"].astype(np.int64)
    mask = encoded["attention_mask"].astype(np.int64)
    with torch.inference_mode():
        reference = graph(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    candidate = convert.run(session, ids, mask)
    if graph.hidden:
        return quality.cosine(reference, candidate, mask, config.pooling, request.cosine_gate)
    return quality.agreement(reference, candidate, mask, request.agreement_gate)


def _source_version(config: ModelConfig) -> str:
    """The highest version that torch serves: the fp32 reference and the weights exported."""
    torch_versions = [v for v in config.versions if config.runtime_of(v).backend == "torch"]
    if not torch_versions:
        raise ExportRefused(f"model {config.name!r} has no torch version to export from")
    return max(torch_versions, key=version_order)


def _target_version(config: ModelConfig, requested: str) -> str:
    if not requested:
        numbers = [int(v) for v in config.versions if v.isdigit()]
        return str(max(numbers, default=0) + 1)
    if not requested.isdigit():
        raise ExportRefused(f"--version {requested!r}: version folders are numbers")
    if requested in config.versions:
        raise ExportRefused(f"model {config.name!r} already has version {requested}")
    return requested


def _declare(model_toml: Path, version: str, precision: str) -> None:
    """The version's runtime table: onnxruntime on the CPU, the file's own precision."""
    table = (
        f"\n# Version {version}: ONNX ({precision}) written by `fmserve export`; "
        f"its quality report is {version}/{REPORT_FILE}.\n"
        f"[versions.{version}.runtime]\n"
        'backend = "onnxruntime"\ndevice = "cpu"\nprecision = "auto"\n'
    )
    with model_toml.open("a") as file:
        file.write(table)
