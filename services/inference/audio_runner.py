"""One loaded audio model version: pads a batch of clips (1-D float32 samples at the model's
rate) to its longest, with an attention mask from their lengths, runs its backend under
inference_mode and returns one numpy array per clip. Called in an executor thread.

    audio-classification    the classifier's logits                 [C] per clip
    speech-recognition      a CTC model's logits per frame          [frames, V] per clip
    voice-activity          the speech probability per frame        [frames] per clip

A wav2vec2 model whose feature extractor says it takes no attention mask (the group-norm ones,
wav2vec2-base) gives a padded clip other outputs than the clip alone; such a model runs each
clip of a batch unpadded, so every answer is the one the clip gets alone.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from fmserve.core.audio import audio_features, framing
from fmserve.core.repository import ModelConfig, Runtime
from fmserve.core.tasks import TaskName
from fmserve.errors import Overloaded
from services.inference.backend import Backend, load_backend
from services.inference.runner import Forward


class AudioRunner:
    """Forward passes of one audio model version on its backend."""

    per_token = False

    def __init__(
        self, config: ModelConfig, backend: Backend, runtime: Runtime, files: Path
    ) -> None:
        self.config = config
        self.backend = backend
        self.runtime = runtime
        self.features = audio_features(config.task, files)
        self.framing = framing(config.task, files)
        self._batched = self.features.return_attention_mask or not self.framing.convolutions

    @classmethod
    def load(
        cls, config: ModelConfig, version: str, cuda_devices: int | None = None
    ) -> AudioRunner:
        backend = load_backend(config, version, cuda_devices)
        return cls(config, backend, config.runtime_of(version), config.files(version))

    def cost(self, clip: np.ndarray) -> int:
        """A clip's share of a batch's max_batch_tokens: its output frames."""
        return max(1, clip.size // self.framing.frame_samples)

    def forward(self, clips: list[np.ndarray]) -> Forward:
        """One output per clip, in order, and how long each phase took."""
        started = time.perf_counter_ns()
        try:
            with torch.inference_mode():
                batches = [clips] if self._batched else [[clip] for clip in clips]
                padded = [self._padded(batch) for batch in batches]
                copied = time.perf_counter_ns()
                out = [self.backend(values, mask) for values, mask in padded]
                self.backend.synchronize()
        except torch.OutOfMemoryError as exc:
            raise Overloaded(
                f"the model ran out of memory on a batch of {len(clips)} clips; "
                "retry, or send fewer or shorter clips"
            ) from exc
        computed = time.perf_counter_ns()
        arrays = [array for batch in out for array in batch.float().cpu().numpy()]
        outputs = [self._cut(array, clip) for array, clip in zip(arrays, clips, strict=True)]
        return Forward(
            outputs, copied - started, computed - copied, time.perf_counter_ns() - computed
        )

    def _padded(self, clips: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(clip.size for clip in clips)
        values = np.full((len(clips), longest), self.features.padding_value, dtype=np.float32)
        mask = np.zeros((len(clips), longest), dtype=np.int64)
        for row, clip in enumerate(clips):
            values[row, : clip.size] = clip
            mask[row, : clip.size] = 1
        device = self.backend.device
        return torch.from_numpy(values).to(device), torch.from_numpy(mask).to(device)

    def _cut(self, array: np.ndarray, clip: np.ndarray) -> np.ndarray:
        if self.config.task is TaskName.AUDIO_CLASSIFICATION:
            return array
        return array[: self.framing.frames(clip.size)]
