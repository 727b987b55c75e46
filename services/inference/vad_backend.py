"""The Silero voice activity detector on onnxruntime: its streaming graph (`silero_vad.onnx`,
from the PyPI package silero-vad) takes one 512-sample frame of 16 kHz audio at a time, after
the previous frame's last 64 samples, and carries an LSTM state from frame to frame. A batch of
clips is streamed together, frame by frame, one row per clip (the graph takes a batch); each
clip's frames past its end see zeros and are cut off by the runner, and the graph is causal, so
a clip's probabilities are the same as streamed alone.

A version is the .onnx file itself (`source = "package:silero_vad/data/silero_vad.onnx"`) or a
folder holding it as model.onnx.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from fmserve.core.audio import SILERO_CONTEXT_SAMPLES, SILERO_FRAME_SAMPLES, SILERO_RATE
from fmserve.core.repository import ModelConfig
from services.inference.loading import LoadFailed
from services.inference.memory import Footprint
from services.inference.onnx_backend import MODEL_FILE, configured_threads, open_session

_GRAPH_INPUTS = {"input", "state", "sr"}
_STATE_SIZE = 128


class SileroBackend:
    device = torch.device("cpu")
    hf_config = None

    def __init__(self, session: ort.InferenceSession, weights: int) -> None:
        self.session = session
        self._weights = weights
        self._rate = np.array(SILERO_RATE, dtype=np.int64)

    @classmethod
    def load(cls, config: ModelConfig, version: str, onnx: bool) -> SileroBackend:
        if not onnx:
            raise LoadFailed(
                'a voice-activity model runs on onnxruntime: set [runtime] backend = "onnxruntime"'
            )
        session = open_session(model_file(config.files(version)), configured_threads())
        names = {i.name for i in session.get_inputs()}
        if names != _GRAPH_INPUTS:
            raise LoadFailed(
                f"its graph takes inputs {sorted(names)}; the Silero VAD's streaming graph "
                f"(silero_vad.onnx) takes {sorted(_GRAPH_INPUTS)}"
            )
        return cls(session, model_file(config.files(version)).stat().st_size)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Speech probability per frame, [clips, frames], of 16 kHz samples [clips, samples]."""
        frames = framed(ids.numpy())
        state = np.zeros((2, frames.shape[0], _STATE_SIZE), dtype=np.float32)
        probabilities = np.empty(frames.shape[:2], dtype=np.float32)
        for index in range(frames.shape[1]):
            feeds = {"input": frames[:, index], "state": state, "sr": self._rate}
            out, state = self.session.run(None, feeds)
            probabilities[:, index] = out[:, 0]
        return torch.from_numpy(probabilities)

    def synchronize(self) -> None:
        """The CPU session returns when its work is done."""

    def footprint(self) -> Footprint:
        """The session's weights: its model file's size."""
        return Footprint(self._weights)


def framed(samples: np.ndarray) -> np.ndarray:
    """[clips, frames, 64 + 512]: each frame after the previous frame's last 64 samples (zeros
    before the first); the last frame zero-padded."""
    clips, count = samples.shape
    frames = -(-count // SILERO_FRAME_SAMPLES)
    padded = np.zeros(
        (clips, SILERO_CONTEXT_SAMPLES + frames * SILERO_FRAME_SAMPLES), dtype=np.float32
    )
    padded[:, SILERO_CONTEXT_SAMPLES : SILERO_CONTEXT_SAMPLES + count] = samples
    window = SILERO_CONTEXT_SAMPLES + SILERO_FRAME_SAMPLES
    starts = np.arange(frames) * SILERO_FRAME_SAMPLES
    return padded[:, starts[:, None] + np.arange(window)]


def model_file(path: Path) -> Path:
    """The graph of a version: the file itself, or model.onnx in its folder."""
    return path if path.is_file() else path / MODEL_FILE
