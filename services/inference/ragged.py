"""The two request forms of the tensor contract, and the per-sequence arrays batches are made of.

    ragged   input_ids INT64 [total_tokens] + lengths INT32 [B] or [B, 1]   (fmserve's gateway)
    padded   input_ids INT64 [B, T] + attention_mask INT64 [B, T]           (standard v2 tooling)

A request becomes one 1-D array of token ids per sequence; each batch is padded to its own
longest sequence (`pad`); answers go back in the request's form (`join`). An audio model's
request is one form only:

    clips    input_values FP32 [B, samples] zero-padded + lengths INT32 [B] or [B, 1] (optional)

its clips are 1-D sample arrays, and per-frame answers go back padded with each clip's frame
count (`join_frames`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fmserve.errors import InvalidInput


@dataclass(frozen=True)
class Layout:
    """How a request laid out its sequences, so that per-token answers go back the same way."""

    mask: np.ndarray | None = None
    """[B, T] booleans for a padded request (True where a token is); None for a ragged one."""
    mask_assumed: bool = False
    """A padded request sent without attention_mask: every position was taken as a token, which
    is right only if no row was padded (the model checks its rows for its pad token)."""


def split_ragged(ids: np.ndarray, lengths: np.ndarray) -> tuple[list[np.ndarray], Layout]:
    """Cut the concatenated ids of a ragged request into its sequences. `lengths` is [B], or
    [B, 1] as ModelConfig declares it (one count per batch item)."""
    if lengths.ndim == 2 and lengths.shape[1] == 1:
        lengths = lengths[:, 0]
    if ids.ndim != 1 or lengths.ndim != 1:
        raise InvalidInput(
            "ragged form: input_ids must have shape [total_tokens] and lengths shape [B] or "
            f"[B, 1]; got {list(ids.shape)} and {list(lengths.shape)}"
        )
    _require_sequences(lengths.size)
    if (lengths <= 0).any():
        raise InvalidInput("lengths: every sequence needs at least one token")
    total = int(lengths.astype(np.int64).sum())
    if total != ids.size:
        raise InvalidInput(f"lengths sum to {total} tokens but input_ids holds {ids.size}")
    return np.split(ids, np.cumsum(lengths[:-1], dtype=np.int64)), Layout()


def split_padded(
    ids: np.ndarray, mask: np.ndarray | None = None
) -> tuple[list[np.ndarray], Layout]:
    """The sequences of a padded request: the ids where the attention mask is 1; every id when
    there is no mask (`Layout.mask_assumed`)."""
    if ids.ndim != 2:
        raise InvalidInput(
            "input_ids: send shape [B, T] (padded form) or [total_tokens] with lengths [B] "
            f"(ragged form); got {list(ids.shape)}"
        )
    _require_sequences(ids.shape[0])
    if mask is None:
        return list(ids), Layout(np.ones(ids.shape, dtype=bool), mask_assumed=True)
    if mask.shape != ids.shape:
        raise InvalidInput(
            f"attention_mask has shape {list(mask.shape)}; "
            f"it must match input_ids' {list(ids.shape)}"
        )
    elif not np.isin(mask, (0, 1)).all():
        raise InvalidInput("attention_mask: values must be 0 or 1")
    mask = mask.astype(bool)
    if not mask.any(axis=1).all():
        raise InvalidInput("attention_mask: every sequence needs at least one token")
    return [row[keep] for row, keep in zip(ids, mask, strict=True)], Layout(mask)


def split_clips(values: np.ndarray, lengths: np.ndarray | None) -> list[np.ndarray]:
    """The clips of an audio request: each row of input_values cut to its length (the whole
    row when lengths is absent)."""
    if values.ndim != 2:
        raise InvalidInput(f"input_values: send shape [clips, samples]; got {list(values.shape)}")
    _require_sequences(values.shape[0])
    if lengths is None:
        lengths = np.full(values.shape[0], values.shape[1])
    if lengths.ndim == 2 and lengths.shape[1] == 1:
        lengths = lengths[:, 0]
    if lengths.shape != (values.shape[0],):
        raise InvalidInput(
            f"lengths has shape {list(lengths.shape)}; send one sample count per clip: "
            f"[{values.shape[0]}]"
        )
    if (lengths <= 0).any() or (lengths > values.shape[1]).any():
        raise InvalidInput(
            f"lengths: every clip needs 1 to {values.shape[1]} samples (input_values' width)"
        )
    return [row[:length] for row, length in zip(values, lengths.tolist(), strict=True)]


def join_frames(outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame outputs ([frames] or [frames, C] per clip) as one array zero-padded to the
    longest clip's frames, and each clip's frame count, INT32 [B, 1]."""
    frames = np.array([[len(output)] for output in outputs], dtype=np.int32)
    joined = np.zeros((len(outputs), int(frames.max()), *outputs[0].shape[1:]), dtype=np.float32)
    for row, output in enumerate(outputs):
        joined[row, : len(output)] = output
    return joined, frames


def pad(sequences: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad sequences to the longest one: ids and attention mask, both int64 [B, T]."""
    longest = max(len(s) for s in sequences)
    ids = np.full((len(sequences), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), longest), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    return ids, mask


def join(outputs: list[np.ndarray], layout: Layout, per_token: bool) -> np.ndarray:
    """One output tensor from per-sequence outputs: [B, ...] for per-sequence answers; for
    per-token ones [total_tokens, C] (ragged) or [B, T, C] with zeros at padding (padded)."""
    if not per_token:
        return np.stack(outputs)
    if layout.mask is None:
        return np.concatenate(outputs)
    joined = np.zeros((*layout.mask.shape, outputs[0].shape[-1]), dtype=outputs[0].dtype)
    for row, output in enumerate(outputs):
        joined[row, layout.mask[row]] = output
    return joined


def _require_sequences(count: int) -> None:
    if count == 0:
        raise InvalidInput("the request holds no sequences; send at least one")
