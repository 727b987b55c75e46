"""The one boundary with Hugging Face tokenizers: loads a fast tokenizer from local files and
turns a batch of texts into ragged numpy arrays. Library errors are translated here."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer

from fmserve.errors import FmserveError


@dataclass(frozen=True)
class Tokenized:
    """A batch of texts as token ids, concatenated without padding."""

    input_ids: np.ndarray
    """INT64 [total_tokens]: every text's ids, special tokens included, one text after another."""
    lengths: np.ndarray
    """INT32 [texts]: tokens per text; they sum to total_tokens."""
    offsets: np.ndarray | None = None
    """INT32 [total_tokens, 2]: each token's (start, end) characters; (0, 0) for special tokens."""

    @property
    def total_tokens(self) -> int:
        return int(self.input_ids.shape[0])


class HfTokenizer:
    """A fast (Rust) tokenizer, safe to share between threads."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        # transformers configures truncation on the shared Rust tokenizer before every call, so
        # two threads asking for different truncation would race: one call at a time.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: Path) -> HfTokenizer:
        """Load from local files only: no hub, no remote code. Blocks; call it off the loop."""
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                folder, local_files_only=True, trust_remote_code=False
            )
        except Exception as exc:  # any failure here means the model's files cannot be used
            raise FmserveError(f"cannot load the tokenizer in {folder}: {exc}") from exc
        if not getattr(tokenizer, "is_fast", False):
            raise FmserveError(f"{folder}: needs a fast tokenizer (tokenizer.json) for offsets")
        return cls(tokenizer)

    def encode(
        self, texts: Sequence[str], max_length: int | None = None, offsets: bool = False
    ) -> Tokenized:
        """Tokenize all texts in one call, special tokens included; with `max_length`, texts
        are cut to that many tokens. Blocks; call it off the event loop."""
        with self._lock:
            batch = self._tokenizer(
                list(texts),
                add_special_tokens=True,
                padding=False,
                truncation=max_length is not None,
                max_length=max_length,
                return_offsets_mapping=offsets,
                return_attention_mask=False,
                return_token_type_ids=False,
            )
        ids = batch["input_ids"]
        lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
        total = int(lengths.sum())
        return Tokenized(
            input_ids=np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=total),
            lengths=lengths,
            offsets=_offsets(batch["offset_mapping"], total) if offsets else None,
        )


def _offsets(mapping: list[list[tuple[int, int]]], total: int) -> np.ndarray:
    pairs = chain.from_iterable(chain.from_iterable(mapping))
    return np.fromiter(pairs, dtype=np.int32, count=2 * total).reshape(total, 2)
