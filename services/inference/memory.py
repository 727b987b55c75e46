"""What a loaded model version occupies: the bytes of its weights and buffers, on the device
they live on, counted once after the load (Triton's ModelStatistics.memory_usage, the memory
budget, `fmserve_inference_model_memory_bytes`).

Counted from the tensors rather than as the process's resident-set growth around the load: on
all-MiniLM-L6-v2 (CPU) the tensors hold 90.9 MB every time, while the RSS delta read 104 MB for
a first load (libraries initialising) and 52 MB for a second one (the allocator reused memory
freed earlier), and concurrent loads and requests blur it further. Activations come and go per
batch and are not counted; a text-generation version's KV cache is bounded apart, by its
[generation] max_batch_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fmserve.core.gguf import is_gguf
from fmserve.core.repository import ModelConfig


@dataclass(frozen=True)
class Footprint:
    bytes: int
    kind: str = "CPU"
    """Triton's memory type: "CPU" or "GPU"."""
    device_id: int = 0


def module_footprint(module: torch.nn.Module, device: torch.device) -> Footprint:
    """Every distinct tensor of a module's state (tied weights once; the packed weights of
    int8-quantised layers, which are not parameters, included) and its buffers."""
    sizes: dict[tuple[str, int], int] = {}
    for value in [*module.state_dict().values(), *module.buffers()]:
        _collect(value, sizes)
    kind = "GPU" if device.type == "cuda" else "CPU"
    return Footprint(sum(sizes.values()), kind, device.index or 0)


def estimate(config: ModelConfig, version: str) -> int:
    """Bytes a version will take, read before its load from the size of its weight files; the
    measured footprint replaces it once loaded."""
    path = config.versions[version]
    if is_gguf(path) or path.is_file():
        return path.stat().st_size
    if config.runtime_of(version).backend == "onnxruntime":
        return _size(path / "model.onnx")
    return sum(_size(weights) for weights in path.glob("*.safetensors"))


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _collect(value: Any, sizes: dict[tuple[str, int], int]) -> None:
    if isinstance(value, torch.Tensor):
        if value.is_quantized or value.numel():
            sizes[(str(value.device), value.data_ptr())] = value.numel() * value.element_size()
    elif isinstance(value, tuple | list):
        for item in value:
            _collect(item, sizes)
