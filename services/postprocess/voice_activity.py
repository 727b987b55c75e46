"""Voice activity: a clip's speech probability per frame → the stretches in which someone speaks.
Frames at or over the model's `[vad] threshold` are speech; stretches of speech apart by less
silence than `[vad] min_silence_s` are merged into one segment."""

from __future__ import annotations

import numpy as np

from fmserve.core.repository import Vad
from services.postprocess.results import Segment, VoiceActivity


def voice_activity(probabilities: np.ndarray, frame_s: float, vad: Vad) -> VoiceActivity:
    """One clip's activity from its probabilities [frames] (its frames only)."""
    return VoiceActivity(probabilities, frame_s, segments(probabilities, frame_s, vad))


def segments(probabilities: np.ndarray, frame_s: float, vad: Vad) -> list[Segment]:
    """Speech segments in seconds, in order, none overlapping."""
    starts, ends = _speech_runs(probabilities >= vad.threshold)
    if starts.size == 0:
        return []
    # a run starts a new segment only after enough silence since the previous one's end
    gaps = (starts[1:] - ends[:-1]) * frame_s
    new = np.concatenate(([True], gaps >= vad.min_silence_s))
    first = starts[new]
    last = ends[np.concatenate((new[1:], [True]))]
    return [
        Segment(float(s * frame_s), float(e * frame_s)) for s, e in zip(first, last, strict=True)
    ]


def _speech_runs(speech: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each run of speech frames as [start, end) frame indices."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], speech.astype(np.int8), [0]))))
    return edges[0::2], edges[1::2]
