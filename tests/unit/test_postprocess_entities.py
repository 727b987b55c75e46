"""Entity grouping of the postprocess service: hand-made logits with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from services.postprocess.entities import find_entities, split_tag
from services.postprocess.results import Entity

LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
SPECIAL = (0, 0)


def _logits(tags: list[str], labels=LABELS, confidence: float = 0.9) -> np.ndarray:
    """One row per token whose softmax gives `confidence` to its tag, the rest shared evenly."""
    rest = (1 - confidence) / (len(labels) - 1)
    probs = np.full((len(tags), len(labels)), rest)
    probs[np.arange(len(tags)), [labels.index(t) for t in tags]] = confidence
    return np.log(probs).astype(np.float32)


def _entities(text, tokens, labels=LABELS, logits=None):
    """Entities of one text given (tag, (start, end)) per token."""
    tags = [tag for tag, _ in tokens]
    offsets = np.array([span for _, span in tokens], dtype=np.int32)
    logits = _logits(tags, labels) if logits is None else logits
    lengths = np.array([len(tokens)], dtype=np.int32)
    (found,) = find_entities(logits, lengths, offsets, [text], labels)
    return [(e.label, e.text, e.start, e.end) for e in found]


def test_split_tag():
    assert split_tag("B-PER") == ("B", "PER")
    assert split_tag("I-LOC") == ("I", "LOC")
    assert split_tag("MISC") == ("", "MISC")
    assert split_tag("O") == ("", "O")


def test_bio_tags_become_spans_with_their_text():
    text = "Wolfgang Mozart lives in Salzburg."
    tokens = [
        ("O", SPECIAL),
        ("B-PER", (0, 8)),
        ("I-PER", (9, 15)),
        ("O", (16, 21)),
        ("O", (22, 24)),
        ("B-LOC", (25, 33)),
        ("O", (33, 34)),
        ("O", SPECIAL),
    ]

    assert _entities(text, tokens) == [
        ("PER", "Wolfgang Mozart", 0, 15),
        ("LOC", "Salzburg", 25, 33),
    ]


def test_a_b_tag_starts_a_new_entity_of_the_same_type():
    text = "Anna Bob"
    tokens = [("B-PER", (0, 4)), ("B-PER", (5, 8))]

    assert _entities(text, tokens) == [("PER", "Anna", 0, 4), ("PER", "Bob", 5, 8)]


def test_an_i_tag_of_another_type_starts_a_new_entity():
    text = "Anna Paris"
    tokens = [("B-PER", (0, 4)), ("I-LOC", (5, 10))]

    assert _entities(text, tokens) == [("PER", "Anna", 0, 4), ("LOC", "Paris", 5, 10)]


def test_an_i_tag_without_a_b_starts_an_entity():
    text = "in Paris"
    tokens = [("O", (0, 2)), ("I-LOC", (3, 8))]

    assert _entities(text, tokens) == [("LOC", "Paris", 3, 8)]


def test_o_and_special_tokens_end_an_entity():
    text = "Paris Rome"
    tokens = [("B-LOC", (0, 5)), ("O", SPECIAL), ("I-LOC", (6, 10))]

    assert _entities(text, tokens) == [("LOC", "Paris", 0, 5), ("LOC", "Rome", 6, 10)]


def test_word_pieces_tagged_b_merge_into_their_word():
    text = "Wolfgang lives in Salzburg, Austria"
    # wolf ##gang, salz ##burg: every piece tagged B- (models trained that way)
    tokens = [
        ("B-PER", (0, 4)),
        ("B-PER", (4, 8)),
        ("O", (9, 14)),
        ("O", (15, 17)),
        ("B-LOC", (18, 22)),
        ("B-LOC", (22, 26)),
        ("O", (26, 27)),
        ("B-LOC", (28, 35)),
    ]

    assert _entities(text, tokens) == [
        ("PER", "Wolfgang", 0, 8),
        ("LOC", "Salzburg", 18, 26),
        ("LOC", "Austria", 28, 35),
    ]


def test_adjacent_punctuation_is_not_a_word_piece():
    text = "Paris.Rome"
    tokens = [("B-LOC", (0, 5)), ("B-LOC", (5, 6)), ("B-LOC", (6, 10))]

    assert _entities(text, tokens) == [
        ("LOC", "Paris", 0, 5),
        ("LOC", ".", 5, 6),
        ("LOC", "Rome", 6, 10),
    ]


def test_labels_without_prefixes_group_while_the_same():
    labels = ("O", "PER", "LOC")
    text = "Ada Lovelace in London"
    tokens = [("PER", (0, 3)), ("PER", (4, 12)), ("O", (13, 15)), ("LOC", (16, 22))]

    assert _entities(text, tokens, labels) == [
        ("PER", "Ada Lovelace", 0, 12),
        ("LOC", "London", 16, 22),
    ]


def test_score_is_the_mean_token_probability():
    text = "Ada Lovelace"
    probs = np.array([[0.1, 0.8, 0.04, 0.03, 0.03], [0.1, 0.2, 0.6, 0.05, 0.05]])
    offsets = np.array([[0, 3], [4, 12]], dtype=np.int32)

    (found,) = find_entities(
        np.log(probs).astype(np.float32), np.array([2]), offsets, [text], LABELS
    )

    assert found == [Entity("PER", pytest.approx(0.7, rel=1e-6), 0, 12, "Ada Lovelace")]


def test_tokens_are_split_between_texts_by_lengths():
    texts = ["Anna", "in Rome", "nothing"]
    tags = ["O", "B-PER", "O", "O", "O", "B-LOC", "O", "O", "O", "O"]
    offsets = [(0, 0), (0, 4), (0, 0), (0, 0), (0, 2), (3, 7), (0, 0), (0, 0), (0, 7), (0, 0)]

    found = find_entities(
        _logits(tags),
        np.array([3, 4, 3], dtype=np.int32),
        np.array(offsets, dtype=np.int32),
        texts,
        LABELS,
    )

    assert [[(e.label, e.text) for e in spans] for spans in found] == [
        [("PER", "Anna")],
        [("LOC", "Rome")],
        [],
    ]


def test_a_text_without_tokens_has_no_entities():
    found = find_entities(
        np.zeros((0, 5), dtype=np.float32),
        np.array([0], dtype=np.int32),
        np.zeros((0, 2), dtype=np.int32),
        ["x"],
        LABELS,
    )

    assert found == [[]]
