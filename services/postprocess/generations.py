"""The text of a whole generated sequence at once, for the job path: its tokens read one at a
time through the same `Detokenizer` a stream uses, so stop strings cut the text exactly where a
stream would stop, and the tokens after that point are dropped as a stream never gets them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.postprocess.detokenizer import Detokenizer


@dataclass(frozen=True)
class Text:
    text: str
    """The generated text, without the stop string that ended it."""
    tokens: int
    """How many of the generated tokens it covers: all of them, or (stopped) those up to and
    including the one that completed a stop string."""
    stopped: bool
    """A stop string ended it (finish reason "stop")."""


def detokenize(detokenizer: Detokenizer, token_ids: Sequence[int]) -> Text:
    """The sequence's text, read token by token (`detokenizer` fresh, with the stop strings)."""
    text: list[str] = []
    for count, token in enumerate(token_ids, start=1):
        delta = detokenizer.add([token])
        text.append(delta.text)
        if delta.stopped:
            return Text("".join(text), count, stopped=True)
    end = detokenizer.finish()
    return Text("".join(text) + end.text, len(token_ids), end.stopped)
