"""The one boundary with Hugging Face tokenizers: loads a fast tokenizer from local files and
turns a batch of texts into ragged numpy arrays. Library errors are translated here."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Encoding, Tokenizer
from transformers import AutoTokenizer

from fmserve.errors import FmserveError, InvalidInput

log = logging.getLogger("fmserve.preprocess")


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
    """A fast (Rust) tokenizer, safe to share between threads.

    It calls the Rust tokenizer under transformers directly: for a single sentence the Python
    wrapper costs several times the tokenization itself. The Rust tokenizer keeps its
    truncation setting as state, so instead of reconfiguring one (and racing other threads)
    there is one copy per setting: untouched, and one truncating per maximum length.
    """

    def __init__(self, tokenizer: Tokenizer, chat: Any = None) -> None:
        self._plain = _copy(tokenizer, max_length=None)
        self._chat = chat
        """The transformers tokenizer, kept for its chat template; None when it has none."""
        self._truncating: dict[int, Tokenizer] = {}
        self._lock = threading.Lock()  # guards only the creation of truncating copies

    @classmethod
    def load(cls, folder: Path, model: str = "this model") -> HfTokenizer:
        """Load from local files only: no hub, no remote code. Blocks; call it off the loop.
        `model` names it in errors (e.g. "model 'x' version 1"): they reach clients, so they
        name the model, never the server's folders; the log has the folder and the cause."""
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                folder, local_files_only=True, trust_remote_code=False
            )
        except Exception as exc:  # any failure here means the model's files cannot be used
            log.exception("cannot load the tokenizer of %s from %s", model, folder)
            raise FmserveError(
                f"cannot load the tokenizer of {model}; the preprocess service's log says why"
            ) from exc
        if not getattr(tokenizer, "is_fast", False):
            log.error("the tokenizer of %s in %s is not a fast one", model, folder)
            raise FmserveError(f"{model} needs a fast tokenizer (tokenizer.json) for offsets")
        chat = tokenizer if getattr(tokenizer, "chat_template", None) else None
        return cls(tokenizer.backend_tokenizer, chat)

    def encode(
        self, texts: Sequence[str], max_length: int | None = None, offsets: bool = False
    ) -> Tokenized:
        """Tokenize all texts in one call, special tokens included; with `max_length`, texts
        are cut to that many tokens. Short batches are cheap enough for the event loop; long
        ones belong in a thread (the Rust side releases the GIL)."""
        tokenizer = self._plain if max_length is None else self._cutting_at(max_length)
        encodings = tokenizer.encode_batch(list(texts), add_special_tokens=True)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int32, count=len(encodings))
        total = int(lengths.sum())
        ids = chain.from_iterable(e.ids for e in encodings)
        return Tokenized(
            input_ids=np.fromiter(ids, dtype=np.int64, count=total),
            lengths=lengths,
            offsets=_offsets(encodings, total) if offsets else None,
        )

    def encode_prompt(self, prompt: str) -> list[int]:
        """A generation prompt's ids, the tokenizer's special tokens (BOS) added."""
        return list(self._plain.encode(prompt, add_special_tokens=True).ids)

    def encode_chat(self, messages: list[dict[str, str]], model: str = "this model") -> list[int]:
        """Chat messages through the model's chat template, the assistant's turn opened: the
        ids `apply_chat_template(messages, add_generation_prompt=True)` gives."""
        if self._chat is None:
            raise InvalidInput(f"{model} has no chat template; send a prompt instead of messages")
        try:
            text = self._chat.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # the template refused them (e.g. roles out of order)
            raise InvalidInput(f"messages do not fit the chat template of {model}: {exc}") from exc
        # The template writes the special tokens (BOS) itself.
        return list(self._plain.encode(text, add_special_tokens=False).ids)

    def _cutting_at(self, max_length: int) -> Tokenizer:
        tokenizer = self._truncating.get(max_length)
        if tokenizer is None:
            with self._lock:
                tokenizer = self._truncating.setdefault(max_length, _copy(self._plain, max_length))
        return tokenizer


def _copy(tokenizer: Tokenizer, max_length: int | None) -> Tokenizer:
    """An independent Rust tokenizer without padding, truncating at `max_length` if given."""
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_padding()
    if max_length is None:
        copy.no_truncation()
    else:
        copy.enable_truncation(max_length)
    return copy


def _offsets(encodings: list[Encoding], total: int) -> np.ndarray:
    pairs = chain.from_iterable(chain.from_iterable(e.offsets for e in encodings))
    return np.fromiter(pairs, dtype=np.int32, count=2 * total).reshape(total, 2)
