"""Warm-up: the forward passes a version runs before it is READY, so that its first real
request does not pay for the first-call costs (kernel choice, allocator pools, lazy
initialisation: on all-MiniLM-L6-v2 a first 8-token pass took 28 ms, the next ones 13 ms).

Encoders run the batch shapes they will see, bounded to stay fast (about 0.3 s for MiniLM on 2
CPU cores, milliseconds for the tests' 2-layer models): one short sequence, one long one, a
full batch of short ones, and the model.toml's `[warmup] samples` (tokenised) one at a time and
together. Image models run a blank image alone and in a full batch (CLIP its texts too),
audio models a second of faint noise. Text generation prefills a short prompt and decodes a
few steps.
"""

from __future__ import annotations

import numpy as np

from fmserve.core.audio import audio_features
from fmserve.core.repository import ModelConfig
from services.inference.loading import load_tokenizer

SHORT_TOKENS = 16
LONG_TOKENS = 128
"""The long sequence's length, at most: a full batch of long ones took 1.5 s on MiniLM."""
DECODE_STEPS = 4


def batches(
    config: ModelConfig, vocab_size: int, samples: list[np.ndarray]
) -> list[list[np.ndarray]]:
    """The batches an encoder warms up on, each a list of token id sequences."""
    short = _ids(min(SHORT_TOKENS, config.max_length), vocab_size)
    long = _ids(min(LONG_TOKENS, config.max_length), vocab_size)
    full = max(
        1, min(config.batching.max_batch_size, config.batching.max_batch_tokens // len(short))
    )
    warm = [[short], [long], [short] * full]
    if samples:
        warm += [[sample] for sample in samples] + [samples]
    return warm


def audio_batches(config: ModelConfig, version: str) -> list[list[np.ndarray]]:
    """The batches an audio model warms up on: a second of faint noise at the model's rate,
    alone and as a full batch."""
    rate = audio_features(config.task, config.files(version)).sampling_rate
    clip = np.random.default_rng(0).normal(0, 0.01, rate).astype(np.float32)
    return [[clip], [clip] * max(1, min(config.batching.max_batch_size, 4))]


def image_batches(config: ModelConfig) -> list[list[np.ndarray]]:
    """The batches an image model warms up on: a blank image of the model's size (pixel
    values as preprocess makes them), alone and as a full batch."""
    image = np.zeros((3, config.image_size, config.image_size), dtype=np.float32)
    return [[image], [image] * max(1, min(config.batching.max_batch_size, 4))]


def samples(config: ModelConfig, version: str) -> list[np.ndarray]:
    """The `[warmup] samples` as token ids, by the version's own tokenizer (none: no load)."""
    if not config.warmup.samples:
        return []
    tokenizer = load_tokenizer(config.files(version))
    encoded = tokenizer(list(config.warmup.samples), truncation=True, max_length=config.max_length)
    return [np.asarray(ids, dtype=np.int64) for ids in encoded["input_ids"]]


def prompt(config: ModelConfig, vocab_size: int) -> list[int]:
    """A generation model's warm-up prompt."""
    return [int(i) for i in _ids(min(SHORT_TOKENS, config.max_length - DECODE_STEPS), vocab_size)]


def _ids(length: int, vocab_size: int) -> np.ndarray:
    """Ordinary token ids, clear of the low ids where vocabularies keep their special tokens."""
    low = min(1000, vocab_size // 2)
    return (low + np.arange(length, dtype=np.int64) * 7919) % (vocab_size - low) + low
