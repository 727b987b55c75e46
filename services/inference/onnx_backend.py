"""The onnxruntime backend: an InferenceSession over a version's `model.onnx` (as `fmserve
export` writes it: inputs input_ids and attention_mask [B, T], one output), on the CPU.

Its threads are set like torch's, from the same settings (`configure_threads`): intra-op threads
per forward pass, inter-op threads, and no spinning between operators under the PASSIVE wait
policy (spinning threads slowed the model 6-23x whenever another process kept a core busy)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from fmserve.core.repository import ModelConfig
from services.inference.loading import LoadFailed, scrubbed
from services.inference.memory import Footprint

log = logging.getLogger("fmserve.inference.onnx")

MODEL_FILE = "model.onnx"
# What a text encoder's graph may take; token_type_ids (in graphs exported by other tools) are
# all zeros for one-segment texts, as torch's BERT assumes when it is not given.
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class Threads:
    intra_op: int = 1
    inter_op: int = 1
    spinning: bool = False


_threads = Threads()


def configure_threads(intra_op: int, inter_op: int, spinning: bool) -> None:
    """The threads of every session this process opens (like torch's, process-wide)."""
    global _threads
    _threads = Threads(intra_op, inter_op, spinning)


def configured_threads() -> Threads:
    """The threads set by `configure_threads`, for every session this process opens."""
    return _threads


def session_options(threads: Threads) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads.intra_op
    options.inter_op_num_threads = threads.inter_op
    # one operator at a time, like torch's eager forward: inter-op threads stay idle otherwise
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    spin = "1" if threads.spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    options.log_severity_level = 3  # errors only: its warnings are not the operator's to fix
    return options


class OnnxBackend:
    device = torch.device("cpu")

    def __init__(self, session: ort.InferenceSession, hf_config: Any, weights: int = 0) -> None:
        self.session = session
        self.hf_config = hf_config
        self._weights = weights
        self._inputs = [i.name for i in session.get_inputs()]
        self._output = session.get_outputs()[0].name

    @classmethod
    def load(cls, config: ModelConfig, version: str) -> OnnxBackend:
        runtime = config.runtime_of(version)
        if runtime.device not in ("auto", "cpu"):
            raise LoadFailed(
                f"runtime.device {runtime.device!r}: the onnxruntime backend runs on the CPU "
                '(its CPU package is installed); use "auto" or "cpu", or backend = "torch"'
            )
        files = config.files(version)
        session = open_session(files / MODEL_FILE, configured_threads())
        backend = cls(session, _hf_config(files), (files / MODEL_FILE).stat().st_size)
        backend._check_inputs()
        return backend

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        (out,) = self.session.run([self._output], {k: feeds[k] for k in self._inputs})
        return torch.from_numpy(out)

    def synchronize(self) -> None:
        """The CPU session returns when its work is done."""

    def footprint(self) -> Footprint:
        """The session's weights: its model file's size (the initializers dominate it)."""
        return Footprint(self._weights)

    def _check_inputs(self) -> None:
        unknown = [name for name in self._inputs if name not in _INPUTS]
        if unknown or "input_ids" not in self._inputs:
            raise LoadFailed(
                f"its {MODEL_FILE} takes inputs {self._inputs}; a text encoder's are "
                f"input_ids and optionally {', '.join(_INPUTS[1:])} (export it with "
                "`fmserve export`)"
            )


def open_session(path: Path, threads: Threads) -> ort.InferenceSession:
    """An InferenceSession on the CPU; a missing or unreadable file is LoadFailed with the fix."""
    if not path.is_file():
        raise LoadFailed(
            f"its folder has no {MODEL_FILE}; write one with `fmserve export --format onnx`, "
            'or set [runtime] backend = "torch"'
        )
    try:
        return ort.InferenceSession(
            str(path), session_options(threads), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime's own exception types (Fail, InvalidProtobuf, …)
        log.exception("opening %s failed", path)
        raise LoadFailed(
            f"its {MODEL_FILE} could not be loaded (corrupt or not an ONNX model?): "
            f"{scrubbed(str(exc), path.parent)}"
        ) from exc


def _hf_config(files: Path) -> Any:
    """vocab_size and pad_token_id from the version's config.json (the runner's checks)."""
    try:
        raw = json.loads((files / "config.json").read_text())
        return SimpleNamespace(vocab_size=raw["vocab_size"], pad_token_id=raw.get("pad_token_id"))
    except (OSError, ValueError, KeyError) as exc:
        raise LoadFailed(
            f"its config.json (with vocab_size) could not be read: {scrubbed(str(exc), files)}"
        ) from exc
