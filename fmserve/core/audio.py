"""What every service knows about an audio model's framing, read from its files: the rate and
normalisation its feature extractor expects (`preprocessor_config.json`, as transformers'
Wav2Vec2FeatureExtractor saves it), how many samples one output frame spans, and the Silero
voice activity detector's fixed framing.

    preprocess    resamples to `sampling_rate`, normalises when `do_normalize`, pads
    preprocess    the shortest clip a model takes (its convolutions' receptive field)
    inference     frames per clip (a CTC model's logits, the VAD's probabilities)
    postprocess   seconds per frame, for word timings and speech segments

A version folder is immutable once served, so what is read from it is cached by its path.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fmserve.core.tasks import TaskName

FEATURE_CONFIG = "preprocessor_config.json"

# Silero VAD (16 kHz): each frame is 512 new samples, fed after the previous frame's last 64
# (without that context its scores collapse); the LSTM state carries over between frames.
SILERO_RATE = 16_000
SILERO_FRAME_SAMPLES = 512
SILERO_CONTEXT_SAMPLES = 64


@dataclass(frozen=True)
class AudioFeatures:
    """A model's feature extraction (Wav2Vec2FeatureExtractor's keys and defaults)."""

    sampling_rate: int = 16_000
    """The rate clips are resampled to."""
    do_normalize: bool = True
    """Each clip to zero mean and unit variance over its own samples."""
    padding_value: float = 0.0
    """What pads a clip to the batch's longest."""
    return_attention_mask: bool = False
    """Whether the model takes an attention mask (layer-norm wav2vec2 models); without one,
    padding changes its output, so such a model runs each clip unpadded."""


def audio_features(task: TaskName, files: Path) -> AudioFeatures:
    """The feature extraction of a version's files; the Silero VAD takes raw 16 kHz samples."""
    if task is TaskName.VOICE_ACTIVITY:
        return AudioFeatures(SILERO_RATE, do_normalize=False)
    return _features(files)


@lru_cache(maxsize=256)
def _features(files: Path) -> AudioFeatures:
    raw = _json(files / FEATURE_CONFIG)
    return AudioFeatures(
        sampling_rate=int(raw.get("sampling_rate", 16_000)),
        do_normalize=bool(raw.get("do_normalize", True)),
        padding_value=float(raw.get("padding_value", 0.0)),
        return_attention_mask=bool(raw.get("return_attention_mask", False)),
    )


@dataclass(frozen=True)
class Framing:
    """How a model's output frames tile a clip's samples."""

    frame_samples: int
    """Input samples per output frame: a wav2vec2 model's convolution strides multiplied (320
    for the common 5,2,2,2,2,2,2), or the VAD's frame."""
    convolutions: tuple[tuple[int, int], ...] = ()
    """(kernel, stride) of each convolution of a wav2vec2-style feature encoder, which pads
    nothing; none for the VAD, whose last frame is zero-padded."""

    def frames(self, samples: int) -> int:
        """Output frames of a clip of `samples` (as transformers counts them)."""
        if not self.convolutions:
            return -(-samples // self.frame_samples)
        for kernel, stride in self.convolutions:
            samples = (samples - kernel) // stride + 1
        return max(samples, 0)

    @property
    def min_samples(self) -> int:
        """The shortest clip that gives a frame: the convolutions' receptive field (400
        samples, 25 ms, for wav2vec2's); a shorter clip would crash the model."""
        samples = 1
        for kernel, stride in reversed(self.convolutions):
            samples = (samples - 1) * stride + kernel
        return samples


def framing(task: TaskName, files: Path) -> Framing:
    """A model's framing, from its config.json (the VAD's is fixed)."""
    if task is TaskName.VOICE_ACTIVITY:
        return Framing(SILERO_FRAME_SAMPLES)
    config = _json(files / "config.json")
    kernels = [int(k) for k in config.get("conv_kernel", [])]
    strides = [int(s) for s in config.get("conv_stride", [])]
    if len(kernels) != len(strides):
        raise ValueError("config.json's conv_kernel and conv_stride differ in length")
    return Framing(math.prod(strides), tuple(zip(kernels, strides, strict=True)))


def seconds_per_frame(task: TaskName, files: Path) -> float:
    """How long one output frame lasts, in seconds of the clip."""
    return framing(task, files).frame_samples / audio_features(task, files).sampling_rate


def _json(path: Path) -> dict[str, Any]:
    """A file of the version; missing is a ValueError, which the repository reports as the
    model's ConfigError when it reads the model (so a served model has its files)."""
    if not path.is_file():
        raise ValueError(f"an audio model's folder needs {path.name}; it has none")
    data: dict[str, Any] = json.loads(path.read_text())
    return data
