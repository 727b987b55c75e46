"""What postprocessing produces, one result per text: the domain twins of common.proto's Result."""

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


Result = Embedding | Classification | Entities
