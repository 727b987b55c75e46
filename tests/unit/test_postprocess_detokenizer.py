"""Incremental detokenization against real tokenizers of both kinds a causal LM uses: Llama's
SentencePiece style (a leading "▁" per word, byte-fallback tokens <0xNN>) and GPT-2's byte-level
BPE (every byte a printable character). The hard cases: characters split over tokens, word
pieces that read differently at the start of a text, stop strings across token boundaries."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models

from services.postprocess.detokenizer import Detokenizer

WORDS = ["▁Hello", "▁world", "▁wor", "ld", "!", "▁", "ST", "OP", "▁the", "▁end", "\n"]


def _llama() -> tuple[Tokenizer, dict[str, int]]:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    vocab.update({w: 259 + i for i, w in enumerate(WORDS)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tokenizer.decoder = decoders.Sequence(  # Llama's tokenizer.json decoder
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tokenizer.add_special_tokens(["<s>", "</s>"])
    return tokenizer, vocab


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return table


def _gpt2() -> tuple[Tokenizer, dict[str, int]]:
    vocab = {c: b for b, c in bytes_to_unicode().items()}
    vocab.update({"ĠHello": 256, "Ġworld": 257, "<|endoftext|>": 258})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return tokenizer, vocab


LLAMA, LLAMA_VOCAB = _llama()
GPT2, GPT2_VOCAB = _gpt2()


def llama_decode(ids: list[int]) -> str:
    return LLAMA.decode(list(ids), skip_special_tokens=True)


def gpt2_decode(ids: list[int]) -> str:
    return GPT2.decode(list(ids), skip_special_tokens=True)


def llama_ids(*pieces: str) -> list[int]:
    """Word tokens by name; any other piece as its UTF-8 bytes (byte-fallback tokens)."""
    ids: list[int] = []
    for piece in pieces:
        if piece in LLAMA_VOCAB:
            ids.append(LLAMA_VOCAB[piece])
        else:
            ids.extend(LLAMA_VOCAB[f"<0x{b:02X}>"] for b in piece.encode())
    return ids


def gpt2_ids(text: str) -> list[int]:
    return [GPT2_VOCAB[bytes_to_unicode()[b]] for b in text.encode()]


def stream(detok: Detokenizer, ids: list[int], step: int = 1) -> list[str]:
    deltas = [detok.add(ids[i : i + step]).text for i in range(0, len(ids), step)]
    return [*deltas, detok.finish().text]


def test_word_pieces_keep_their_spaces_after_the_first():
    ids = llama_ids("▁Hello", "▁world", "!")

    deltas = stream(Detokenizer(llama_decode), ids)

    assert deltas == ["Hello", " world", "!", ""]
    assert "".join(deltas) == llama_decode(ids) == "Hello world!"


@pytest.mark.parametrize("char", ["é", "€", "😀"])
def test_a_byte_fallback_character_leaves_whole_once_its_last_byte_arrives(char):
    ids = llama_ids("▁Hello", "▁", char, "!")

    deltas = stream(Detokenizer(llama_decode), ids)

    assert all("\ufffd" not in d for d in deltas)
    assert char in deltas
    assert "".join(deltas) == llama_decode(ids) == f"Hello {char}!"


def test_a_byte_level_character_split_over_tokens_leaves_whole():
    ids = [GPT2_VOCAB["ĠHello"], *gpt2_ids(" naïve 😀"), GPT2_VOCAB["<|endoftext|>"]]

    deltas = stream(Detokenizer(gpt2_decode), ids)

    assert all("\ufffd" not in d for d in deltas)
    assert "😀" in deltas
    assert "".join(deltas) == gpt2_decode(ids) == " Hello naïve 😀"


def test_an_unfinished_character_at_the_end_is_flushed_as_a_full_decode_has_it():
    ids = llama_ids("▁Hello") + llama_ids("😀")[:2]
    detok = Detokenizer(llama_decode)

    assert [detok.add([i]).text for i in ids] == ["Hello", "", ""]
    assert detok.finish().text == "\ufffd\ufffd"
    assert detok.text == llama_decode(ids)


def test_a_stop_string_across_token_boundaries_ends_the_text_before_it():
    detok = Detokenizer(llama_decode, stop=["STOP"])

    deltas = [detok.add(llama_ids(p)) for p in ("▁the", "▁end", "ST", "OP", "!")]

    assert [d.text for d in deltas] == ["the", " end", "", "", ""]
    assert [d.stopped for d in deltas] == [False, False, False, True, True]
    assert detok.text == "the end"
    assert detok.finish().text == ""


def test_a_stop_string_that_starts_inside_a_token_cuts_that_token():
    detok = Detokenizer(llama_decode, stop=[" world"])

    deltas = [detok.add(llama_ids(p)).text for p in ("▁Hello", "▁wor", "ld", "!")]

    assert deltas == ["Hello", "", "", ""]
    assert detok.stopped and detok.text == "Hello"


def test_held_text_is_released_when_the_stop_string_does_not_follow():
    detok = Detokenizer(llama_decode, stop=["STOP", "!!"])

    deltas = [detok.add(llama_ids(p)).text for p in ("▁the", "ST", "▁end", "!")]

    assert deltas == ["the", "", "ST end", ""]
    assert detok.finish().text == "!"
    assert not detok.stopped and detok.text == "theST end!"


def test_the_first_stop_string_completed_wins():
    detok = Detokenizer(llama_decode, stop=["the end!", "end"])

    deltas = [detok.add(llama_ids(p)) for p in ("▁Hello", "▁the", "▁end", "!")]

    assert deltas[2].stopped and detok.text == "Hello the "
    assert "".join(d.text for d in deltas) == detok.text


def test_a_stop_string_inside_one_token_and_several_tokens_per_step():
    detok = Detokenizer(gpt2_decode, stop=["lo w"])

    delta = detok.add([GPT2_VOCAB["ĠHello"], GPT2_VOCAB["Ġworld"]])

    assert delta.stopped and delta.text == " Hel" == detok.text


@pytest.mark.parametrize("seed", range(20))
def test_random_streams_concatenate_to_the_full_decode(seed):
    rng = random.Random(seed)
    pieces = rng.choices([*WORDS, "é", "€", "😀", "日本"], k=rng.randint(1, 40))
    ids = llama_ids(*pieces)
    stop = rng.choice(["", "ST", "d▁", " wor", "€!", "😀 "]).replace("▁", " ")
    detok = Detokenizer(llama_decode, stop=[stop] if stop else [])

    deltas = stream(detok, ids, step=rng.randint(1, 3))

    full = llama_decode(ids)
    expected = full[: full.find(stop)] if stop and stop in full else full
    assert "".join(deltas) == detok.text == expected
    assert all("\ufffd" not in d for d in deltas)
