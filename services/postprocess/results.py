"""What postprocessing produces, one result per text or clip: the domain twins of common.proto's
Result."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Embedding:
    values: np.ndarray
    """FP32 [dim], as the model returned it (normalised there when the model normalises)."""


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float


@dataclass(frozen=True)
class Classification:
    labels: list[LabelScore]
    """Best first."""


@dataclass(frozen=True)
class Entity:
    label: str
    """The entity type, without its B-/I- prefix."""
    score: float
    """Mean probability of the span's tokens."""
    start: int
    end: int
    """Character offsets: text[start:end] is the span."""
    text: str


@dataclass(frozen=True)
class Entities:
    entities: list[Entity]


@dataclass(frozen=True)
class WordTiming:
    word: str
    start_s: float
    end_s: float
    """Seconds from the start of the clip."""


@dataclass(frozen=True)
class Transcription:
    text: str
    words: list[WordTiming]


@dataclass(frozen=True)
class Segment:
    start_s: float
    end_s: float


@dataclass(frozen=True)
class VoiceActivity:
    frame_probabilities: np.ndarray
    """FP32 [frames]: the probability of speech in each frame."""
    frame_s: float
    segments: list[Segment]


Result = Embedding | Classification | Entities | Transcription | VoiceActivity
