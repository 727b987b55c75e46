"""Speech recognition: a CTC model's logits per frame → each clip's text with word timings.

Greedy CTC decoding is the model's own tokenizer's (Wav2Vec2CTCTokenizer.decode of the argmax
ids, with word offsets): repeats collapse, the blank (its pad token) drops out, the word
delimiter ("|") separates words. Special tokens other than the blank stay in the text, as
decode leaves them (skipping them before grouping, as `skip_special_tokens` does, would merge
repeats the blank kept apart and shift the offsets). A word's offsets are frame indices; times
are frames times seconds per frame (the feature encoder's strides over the sampling rate).

The tokenizers load on first use, in the postprocess worker thread that needs them, once per
model version.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import AutoTokenizer, Wav2Vec2CTCTokenizer

from fmserve.core.audio import seconds_per_frame
from fmserve.core.repository import ModelConfig
from fmserve.errors import ConfigError
from services.postprocess.results import Transcription, WordTiming

log = logging.getLogger("fmserve.postprocess")


@dataclass(frozen=True)
class CtcDecoder:
    tokenizer: Any
    """The model's Wav2Vec2CTCTokenizer."""
    frame_s: float

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def decode(self, logits: np.ndarray) -> Transcription:
        """One clip's text and words from its logits [frames, vocab] (its frames only)."""
        ids = logits.argmax(axis=-1).tolist()
        out = self.tokenizer.decode(ids, output_word_offsets=True)
        words = [
            WordTiming(
                w["word"],
                float(w["start_offset"] * self.frame_s),
                float(w["end_offset"] * self.frame_s),
            )
            for w in out.word_offsets
        ]
        return Transcription(out.text, words)


class CtcDecoders:
    """Owns the loaded CTC tokenizers, by model and version."""

    def __init__(self) -> None:
        self._loaded: dict[tuple[str, str], CtcDecoder] = {}
        self._lock = threading.Lock()

    def get(self, config: ModelConfig, version: str) -> CtcDecoder:
        """The decoder of a model version, loaded on first use (blocking: call it in a thread)."""
        key = (config.name, version)
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = _load(config, version)
            return self._loaded[key]

    def clear(self) -> None:
        with self._lock:
            self._loaded.clear()


def _load(config: ModelConfig, version: str) -> CtcDecoder:
    """From local files only (no hub, no remote code); failures name the model, not the folder."""
    files = config.files(version)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            files, local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # any failure here means the model's files cannot be used
        log.exception("cannot load the CTC tokenizer of %s version %s", config.name, version)
        raise ConfigError(
            f"model {config.name!r} cannot be served: its tokenizer could not be loaded; the "
            "postprocess log says why"
        ) from exc
    if not isinstance(tokenizer, Wav2Vec2CTCTokenizer):
        raise ConfigError(
            f"model {config.name!r} cannot be served: speech recognition needs a CTC tokenizer "
            f"(Wav2Vec2CTCTokenizer: vocab.json and tokenizer_config.json), not "
            f"{type(tokenizer).__name__}"
        )
    return CtcDecoder(tokenizer, seconds_per_frame(config.task, files))
