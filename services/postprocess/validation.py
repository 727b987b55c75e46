"""Checks that a batch of model outputs fits its request and its model's labels. Each failure is
an InvalidInput that says what was wrong and what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fmserve.errors import InvalidInput


def check_matrix(output: np.ndarray, name: str) -> None:
    """A finite FP32 [rows, columns] array."""
    if output.dtype != np.float32:
        raise InvalidInput(f"output ({name}) must be FP32, got {output.dtype.name}")
    if output.ndim != 2:
        raise InvalidInput(f"output ({name}) must have 2 dimensions, got shape {_shape(output)}")
    if not np.isfinite(output).all():
        raise InvalidInput(f"output ({name}) holds NaN or infinite values; the model misbehaved")


def check_rows(output: np.ndarray, name: str, texts: Sequence[str]) -> None:
    """One row per text, when the texts were sent."""
    if texts and output.shape[0] != len(texts):
        raise InvalidInput(
            f"output ({name}) has {output.shape[0]} rows but {len(texts)} texts were sent; "
            "send one row per text"
        )


def check_labels(output: np.ndarray, model: str, labels: Sequence[str]) -> None:
    """One column per label of the model."""
    if output.shape[1] != len(labels):
        raise InvalidInput(
            f"output (logits) has {output.shape[1]} columns but model {model!r} has "
            f"{len(labels)} labels; send the logits of this model and version"
        )


def check_tokens(
    logits: np.ndarray, texts: Sequence[str], lengths: np.ndarray | None, offsets: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Token classification: texts, their token counts, and one (start, end) per token that
    falls inside its text. Returns the lengths and offsets, known present."""
    if not texts:
        raise InvalidInput("token classification needs the texts, to cut entities out of them")
    if lengths is None or offsets is None:
        raise InvalidInput("token classification needs the lengths and offsets from preprocess")
    if not (_integers(lengths) and _integers(offsets)):
        raise InvalidInput("lengths and offsets must be INT32 (or INT64), as preprocess sends them")
    if lengths.shape != (len(texts),) or (lengths < 0).any():
        raise InvalidInput(
            f"lengths has shape {_shape(lengths)}; expected [{len(texts)}]: one token count "
            "(0 or more) per text"
        )
    total = int(lengths.sum())
    if total != logits.shape[0]:
        raise InvalidInput(
            f"lengths sum to {total} tokens but output (logits) has {logits.shape[0]} rows; "
            "expected one row per token"
        )
    if offsets.shape != (total, 2):
        raise InvalidInput(
            f"offsets has shape {_shape(offsets)}; expected [{total}, 2]: (start, end) per token"
        )
    check_offsets(offsets, lengths, texts)
    return lengths, offsets


def check_offsets(offsets: np.ndarray, lengths: np.ndarray, texts: Sequence[str]) -> None:
    """Every token's 0 <= start <= end <= len(its text)."""
    sizes = np.repeat([len(text) for text in texts], lengths)
    start, end = offsets[:, 0], offsets[:, 1]
    bad = ((start < 0) | (start > end) | (end > sizes)).nonzero()[0]
    if bad.size:
        token = int(bad[0])
        text = int(np.searchsorted(np.cumsum(lengths), token, side="right"))
        raise InvalidInput(
            f"offsets of token {token} ({start[token]}, {end[token]}) fall outside texts[{text}] "
            f"({sizes[token]} characters); send the offsets preprocess returned for these texts"
        )


def check_frames(
    output: np.ndarray, name: str, lengths: np.ndarray | None, ndim: int
) -> np.ndarray:
    """A per-frame output: finite FP32 with `ndim` dimensions, [clips, frames, ...] padded to
    the longest clip, and each clip's frames (all of them when lengths is absent). Returns the
    frames per clip."""
    if output.dtype != np.float32:
        raise InvalidInput(f"output ({name}) must be FP32, got {output.dtype.name}")
    layout = "[clips, frames, vocabulary]" if ndim == 3 else "[clips, frames]"
    if output.ndim != ndim:
        raise InvalidInput(f"output ({name}) must be {layout}, got shape {_shape(output)}")
    if not np.isfinite(output).all():
        raise InvalidInput(f"output ({name}) holds NaN or infinite values; the model misbehaved")
    clips, frames = output.shape[:2]
    if lengths is None:
        return np.full(clips, frames)
    if lengths.shape == (clips, 1):
        lengths = lengths[:, 0]  # as the inference service's `frames` output comes
    if not _integers(lengths) or lengths.shape != (clips,):
        raise InvalidInput(
            f"lengths has shape {_shape(lengths)}; expected INT32 [{clips}] or [{clips}, 1]: "
            "each clip's frames (the inference service's `frames` output)"
        )
    if (lengths < 0).any() or (lengths > frames).any():
        raise InvalidInput(f"lengths: each clip's frames must lie in [0, {frames}]")
    return lengths


def _integers(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.integer)


def _shape(array: np.ndarray) -> list[int]:
    return list(array.shape)
