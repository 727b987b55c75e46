"""The backend interface: what runs a model version's forward pass. The runner (padding,
pooling, heads, timing) is the same for every backend; a backend turns a padded batch into the
model's one output, as a torch tensor on the CPU or its device:

    encoder (embedding, zero-shot prototypes)    hidden states   [B, T, H]
    text-classification                          logits          [B, C]
    token-classification                         logits          [B, T, C]
    audio-classification (from samples [B, S])   logits          [B, C]
    speech-recognition (from samples [B, S])     logits          [B, frames, V]
    voice-activity (from 16 kHz samples [B, S])  probabilities   [B, frames]
    image-embedding (CLIP), texts                projected text features   [B, D]

and an image model (`ImageBackend`, torch only) turns a batch of pixel_values [B, 3, H, W]
into a classifier's logits [B, C] or CLIP's projected image features [B, D].

    torch        the version's safetensors, on its device and in its precision (loading.py)
    onnxruntime  the version's model.onnx (written by `fmserve export`), on the CPU; the Silero
                 VAD's streaming graph (vad_backend.py)

A version's `[runtime] backend` picks one. Other tasks and media models plug in here the same
way: a backend only has to answer a padded batch with the output the runner's head expects.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from fmserve.core.repository import ModelConfig
from fmserve.core.tasks import TaskName
from services.inference.loading import LoadFailed
from services.inference.memory import Footprint


class Backend(Protocol):
    device: torch.device
    """Where the batch's tensors are put before the call."""
    hf_config: Any
    """The model's Hugging Face config (vocab_size, pad_token_id)."""

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The model's output for a padded batch of token ids, or of an audio model's samples
        (see the module's table)."""
        ...

    def synchronize(self) -> None:
        """Wait for the device's queued work (so that timings are the model's)."""
        ...

    def footprint(self) -> Footprint:
        """The memory its weights take (memory.py), measured once loaded."""
        ...


class ImageBackend(Backend, Protocol):
    def images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The model's output for a batch of images (see the module's table)."""
        ...


def encoder_only(config: ModelConfig) -> bool:
    """Whether the model answers hidden states: embeddings, and zero-shot prototypes on a bare
    encoder whatever the task."""
    return bool(config.prototypes) or config.task is TaskName.EMBEDDING


def load_backend(config: ModelConfig, version: str, cuda_devices: int | None = None) -> Backend:
    """The backend of a version, loaded (slow: run it in a thread); LoadFailed says the fix."""
    # Imported here: a process serves one backend's models without loading the other library.
    onnx = config.runtime_of(version).backend == "onnxruntime"
    if config.task is TaskName.VOICE_ACTIVITY:
        from services.inference.vad_backend import SileroBackend

        return SileroBackend.load(config, version, onnx)
    if onnx:
        if config.task.takes_images:
            raise LoadFailed(
                f"the onnxruntime backend serves text encoders, not {config.task.value}; set "
                '[runtime] backend = "torch"'
            )
        from services.inference.onnx_backend import OnnxBackend

        return OnnxBackend.load(config, version)
    from services.inference.torch_backend import TorchBackend

    return TorchBackend.load(config, version, cuda_devices)
