"""Turning a model version's folder into a torch module: where it runs (device), in what
precision, from safetensors files only, never remote code. transformers' and torch's errors
become `LoadFailed` here, with a message that says what to fix and names no server path (the
full error goes to the log)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModel,
    AutoModelForAudioClassification,
    AutoModelForCausalLM,
    AutoModelForCTC,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)
from transformers.utils import logging as hf_logging

from fmserve.core.repository import Runtime
from fmserve.core.tasks import TaskName
from fmserve.errors import Unavailable, scrub_paths

log = logging.getLogger("fmserve.inference.loading")
# Progress bars would interleave with the JSON log lines on stderr.
hf_logging.disable_progress_bar()

PRECISIONS = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "int8": torch.float32,  # activations stay fp32; Linear weights become int8
}
_AUTO_CLASSES = {
    TaskName.EMBEDDING: AutoModel,
    TaskName.TEXT_CLASSIFICATION: AutoModelForSequenceClassification,
    TaskName.TOKEN_CLASSIFICATION: AutoModelForTokenClassification,
    TaskName.TEXT_GENERATION: AutoModelForCausalLM,
    TaskName.AUDIO_CLASSIFICATION: AutoModelForAudioClassification,
    TaskName.SPEECH_RECOGNITION: AutoModelForCTC,
    TaskName.IMAGE_CLASSIFICATION: AutoModelForImageClassification,
    TaskName.IMAGE_EMBEDDING: AutoModel,  # CLIPModel: both towers and their projections
}
# What transformers raises for a folder it cannot use: missing, truncated or mismatched files.
_LIBRARY_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError, SafetensorError)


class LoadFailed(Unavailable):
    """A model version cannot be loaded: a runtime setting that cannot work here, or files that
    are missing, unsafe or unreadable. The message says which, without server paths."""


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    quantize: bool = False
    """int8: Linear layers dynamically quantised (int8 weights, activations quantised per batch)."""


def place(runtime: Runtime, cuda_devices: int | None = None) -> Placement:
    """Where and in what precision a model runs; a combination that cannot work fails with the fix.
    `cuda_devices` defaults to what this machine has."""
    if cuda_devices is None:
        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    precision = runtime.precision
    if precision not in (*PRECISIONS, "auto"):
        raise LoadFailed(
            f"unknown runtime.precision {precision!r}; use auto or one of {', '.join(PRECISIONS)}"
        )
    device = _device(runtime.device, cuda_devices, precision)
    if precision == "auto":
        precision = auto_precision(device)
    if precision == "fp16" and device.type != "cuda":
        raise LoadFailed(
            "runtime.precision fp16 needs a GPU and this model runs on the CPU; "
            "use fp32, or bf16 (fast on CPUs with AVX512-BF16 or AMX)"
        )
    if precision == "int8" and device.type != "cpu":
        raise LoadFailed(
            "runtime.precision int8 (dynamic quantisation) runs on the CPU only; set "
            'runtime.device = "cpu", or use fp16 or bf16 on the GPU'
        )
    return Placement(device, PRECISIONS[precision], quantize=precision == "int8")


def auto_precision(device: torch.device) -> str:
    """bf16 where the hardware runs it natively (CUDA; CPUs with AVX512-BF16 or AMX), else fp32.
    On a 2-core CPU with AVX512-BF16, bf16 ran all-MiniLM-L6-v2 2.3-3.4x faster than fp32,
    with embeddings at cosine 0.99993 to fp32's; without it (AVX2 only) auto keeps fp32."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if _cpu_has_native_bf16() else "fp32"


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split() for line in cpuinfo if line.startswith("flags")), [])
        return "amx_bf16" in flags or "avx512_bf16" in flags
    except OSError:
        return False


def _device(requested: str, cuda_devices: int, precision: str) -> torch.device:
    if requested == "auto":
        # int8 kernels exist for the CPU only, so "auto" picks the device the precision runs on
        return torch.device("cuda" if cuda_devices and precision != "int8" else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise LoadFailed(
            f'unknown runtime.device {requested!r}; use "auto", "cpu", "cuda" or "cuda:N"'
        )
    if device.type == "cuda" and (device.index or 0) >= cuda_devices:
        raise LoadFailed(
            f"runtime.device {requested!r} asks for a GPU this machine lacks ({cuda_devices} CUDA "
            'devices); use "auto" or "cpu"'
        )
    return device


def load_module(
    files: Path, task: TaskName, placement: Placement, encoder_only: bool = False
) -> torch.nn.Module:
    """The model's torch module in eval mode, on its device and in its precision. `encoder_only`
    loads the bare encoder (hidden states) whatever the task, for prototype classifiers."""
    require_safetensors(files)
    auto_class = AutoModel if encoder_only else _AUTO_CLASSES[task]
    with _translated("weights", files):
        module = auto_class.from_pretrained(
            files, local_files_only=True, use_safetensors=True, trust_remote_code=False
        )
    return _placed(module.eval(), placement)


def load_tokenizer(files: Path) -> Any:
    """The tokenizer saved with the model (local files only, no remote code)."""
    with _translated("tokenizer", files):
        return AutoTokenizer.from_pretrained(files, local_files_only=True, trust_remote_code=False)


def require_safetensors(files: Path) -> None:
    """Refuse folders without safetensors weights: pickle files can run code when loaded."""
    if not files.is_dir():
        raise LoadFailed("its files are missing; check `source` or the version folders")
    if not any(files.glob("*.safetensors")):
        raise LoadFailed(
            "its folder has no *.safetensors weights; convert them to safetensors "
            "(pickle files such as pytorch_model.bin are refused)"
        )


def configure_threads(intra_op: int, inter_op: int) -> None:
    """Torch's thread pools for this process (see the settings for why these are small)."""
    torch.set_num_threads(intra_op)
    try:
        torch.set_num_interop_threads(inter_op)
    except RuntimeError:
        # torch takes this once, before any inter-op work; a process that already did some
        # (tests building the service twice) keeps its first setting
        log.debug("inter-op threads already set; keeping %d", torch.get_num_interop_threads())


def _placed(module: torch.nn.Module, placement: Placement) -> torch.nn.Module:
    if placement.quantize:
        return _quantized(module)
    return module.to(device=placement.device, dtype=placement.dtype)


def _quantized(module: torch.nn.Module) -> torch.nn.Module:
    # torch.ao.quantization is deprecated in favour of torchao, which this stack does not ship;
    # its kernels still work, so its deprecation warnings are silenced for this one call.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*quantiz")
        return torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)


@contextmanager
def _translated(what: str, files: Path) -> Iterator[None]:
    try:
        yield
    except _LIBRARY_ERRORS as exc:
        log.exception("loading the %s from %s failed", what, files)
        raise LoadFailed(f"its {what} could not be loaded: {scrubbed(str(exc), files)}") from exc


def scrubbed(message: str, files: Path) -> str:
    return scrub_paths(message.replace(str(files), "<model folder>"))
