"""Incremental detokenization of one generated sequence, with stop strings.

Token ids arrive a few at a time; text leaves only when it is final:
- never half a UTF-8 character: a byte-level or byte-fallback token may carry part of one,
  which decodes to U+FFFD until the rest arrives;
- never a broken word piece: a SentencePiece-style tokenizer decodes a token differently at
  the start of a text (its leading space is stripped), so each step decodes a short window that
  starts some tokens back and emits what the newest tokens added to it (as vLLM and TGI do);
- never text that may be the start of a stop string: it is held until the next tokens show
  whether the stop string follows. When one does, the sequence's text ends just before it.

The deltas concatenated always equal the final text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Decode = Callable[[Sequence[int]], str]
"""Token ids → text, special tokens skipped (the tokenizer's decode)."""

REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class Delta:
    text: str
    """Text that became final with this step's tokens (often empty while text is held)."""
    stopped: bool = False
    """A stop string was reached: the sequence's text ends before it, and no more is needed."""


class Detokenizer:
    """Owns the token ids and text of one sequence; `add` per step, then `finish` once."""

    def __init__(self, decode: Decode, stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._prefix = 0
        """Where the decoding window starts: the first token of the last emitted piece."""
        self._read = 0
        """Tokens whose text has been decoded into `_text`."""
        self._text = ""
        """Text decoded so far, final as text (whole characters), not yet as an answer."""
        self._released = 0
        """Characters of `_text` already handed out; the rest is held for stop strings."""
        self._stopped = False

    @property
    def text(self) -> str:
        """The text handed out so far (the final text once finished or stopped)."""
        return self._text[: self._released]

    @property
    def stopped(self) -> bool:
        return self._stopped

    def add(self, token_ids: Sequence[int]) -> Delta:
        """The text these tokens make final. After a stop, more tokens add nothing."""
        if self._stopped:
            return Delta("", stopped=True)
        self._ids.extend(token_ids)
        self._text += self._decoded(final=False)
        return self._release(final=False)

    def finish(self) -> Delta:
        """The sequence ended (EOS, a stop token, its length): the rest of its text, held or
        incomplete alike (an unfinished character stays U+FFFD, as a full decode has it)."""
        if self._stopped:
            return Delta("", stopped=True)
        self._text += self._decoded(final=True)
        return self._release(final=True)

    def _decoded(self, final: bool) -> str:
        """What the tokens after `_read` add to the text, or "" while that ends mid-character
        (unless `final`). The window starts at `_prefix`, so the first new token is decoded
        the way it reads after its neighbour, not the way it reads at the start of a text."""
        if self._read == len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if not final and (len(after) <= len(before) or after.endswith(REPLACEMENT)):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def _release(self, final: bool) -> Delta:
        held = self._text[self._released :]
        cut = _first_stop(held, self._stop)
        if cut is not None:
            self._text = self._text[: self._released + cut]
            self._stopped = True
        elif not final:
            cut = len(held) - _stop_prefix(held, self._stop)
        else:
            cut = len(held)
        start, self._released = self._released, self._released + cut
        return Delta(self._text[start : self._released], stopped=self._stopped)


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the earliest stop string in `text` begins, or None."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def _stop_prefix(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that some stop string starts with: held back."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-n:]):
                longest = n
                break
    return longest
