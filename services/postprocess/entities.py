"""Token classification: per-token logits → labelled spans (entities) of each text.

Each token gets its most probable label. Special tokens (offsets (0, 0)) and "O" are outside
every entity. Consecutive tokens form one entity by their tags:

- `B-X` starts a new entity of type X;
- `I-X` continues an entity of type X, and starts one after anything else;
- a label without a prefix (`X`) continues an entity of type X, else starts one;
- word pieces: a `B-X` that continues a word (no space or punctuation between it and the
  previous token) joins that word's X entity, since many models tag every piece `B-`.

An entity spans its first token's start to its last token's end; its score is the mean of its
tokens' probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from services.postprocess.classification import softmax
from services.postprocess.results import Entity

OUTSIDE = "O"


@dataclass
class _Span:
    label: str
    start: int
    end: int
    scores: list[float] = field(default_factory=list)

    def entity(self, text: str) -> Entity:
        score = sum(self.scores) / len(self.scores)
        return Entity(self.label, score, self.start, self.end, text[self.start : self.end])


def split_tag(label: str) -> tuple[str, str]:
    """("B", "PER") for "B-PER", ("I", "PER") for "I-PER", ("", label) for anything else."""
    if label[:2] in ("B-", "I-"):
        return label[0], label[2:]
    return "", label


def find_entities(
    logits: np.ndarray,
    lengths: np.ndarray,
    offsets: np.ndarray,
    texts: Sequence[str],
    labels: Sequence[str],
) -> list[list[Entity]]:
    """Entities of each text, from logits [total_tokens, labels], each text's token count and
    every token's character offsets [total_tokens, 2]."""
    probs = softmax(logits)
    best = probs.argmax(axis=-1)
    scores = np.take_along_axis(probs, best[:, None], axis=-1)[:, 0]
    tags = [split_tag(label) for label in labels]
    ends = np.cumsum(lengths).tolist()
    starts = [0, *ends[:-1]]
    return [
        text_entities(text, [tags[i] for i in best[a:b].tolist()], scores[a:b], offsets[a:b])
        for text, a, b in zip(texts, starts, ends, strict=True)
    ]


def text_entities(
    text: str, tags: list[tuple[str, str]], scores: np.ndarray, offsets: np.ndarray
) -> list[Entity]:
    """Group one text's tagged tokens into entities (see the module docstring)."""
    spans: list[_Span] = []
    current: _Span | None = None
    previous_end = -1
    for (prefix, label), score, (start, end) in zip(
        tags, scores.tolist(), offsets.tolist(), strict=True
    ):
        if start == end or label == OUTSIDE:  # a special token, or outside any entity
            current = None
        elif current and _continues(current, prefix, label, _is_piece(text, previous_end, start)):
            current.end = end
            current.scores.append(score)
        else:
            current = _Span(label, start, end, [score])
            spans.append(current)
        previous_end = -1 if start == end else end
    return [span.entity(text) for span in spans]


def _continues(span: _Span, prefix: str, label: str, piece: bool) -> bool:
    return label == span.label and (prefix != "B" or piece)


def _is_piece(text: str, previous_end: int, start: int) -> bool:
    """True when the token at `start` continues the word the previous token belongs to."""
    return start == previous_end and text[start - 1].isalnum() and text[start].isalnum()
