"""A job item's whole generation turned into its text at once (services/postprocess/
generations.py, codec.generation_to_wire): token by token through the stream's Detokenizer, so
a stop string cuts the text, the token ids, the finish reason and the usage where a stream
stops; without one, the text is the full decode and the inference stage's counts stand."""

from __future__ import annotations

import pytest

from fmserve.v1 import common_pb2
from services.postprocess.codec import generation_to_wire
from services.postprocess.detokenizer import Detokenizer
from services.postprocess.generations import Text, detokenize
from tests.unit.test_postprocess_detokenizer import llama_decode, llama_ids

pytestmark = pytest.mark.timeout(10)


def test_without_a_stop_string_the_text_is_the_full_decode():
    ids = llama_ids("▁Hello", "▁", "€", "▁world", "!")

    text = detokenize(Detokenizer(llama_decode), ids)

    assert text == Text(llama_decode(ids), len(ids), stopped=False)


def test_a_stop_string_across_tokens_cuts_at_the_token_that_completes_it():
    ids = llama_ids("▁Hello", "▁wor", "ld", "!", "▁the", "▁end")

    text = detokenize(Detokenizer(llama_decode, stop=["orld!"]), ids)

    assert text == Text("Hello w", 4, stopped=True)  # "!" completed it: 4 tokens


def test_the_cut_is_where_a_stream_of_single_tokens_stops():
    ids = llama_ids("▁Hello", "▁world", "▁the", "▁end", "!")
    streamed = Detokenizer(llama_decode, stop=["the"])
    deltas = [streamed.add([token]) for token in ids]
    stopped_at = next(n for n, d in enumerate(deltas, start=1) if d.stopped)

    text = detokenize(Detokenizer(llama_decode, stop=["the"]), ids)

    assert text.text == "".join(d.text for d in deltas) == "Hello world "
    assert text.tokens == stopped_at == 3


def test_a_stop_string_only_a_final_decode_reveals_still_stops():
    # The last character is unfinished: only finish() decodes it (U+FFFD), completing "!\ufffd".
    ids = llama_ids("▁Hello", "!") + llama_ids("😀")[:2]

    text = detokenize(Detokenizer(llama_decode, stop=["!\ufffd"]), ids)

    assert text == Text("Hello", len(ids), stopped=True)


def generated(ids: list[int], reason: str) -> common_pb2.Generation:
    usage = common_pb2.Usage(prompt_tokens=5, completion_tokens=len(ids), cached_tokens=2)
    return common_pb2.Generation(token_ids=ids, finish_reason=reason, usage=usage)


def test_a_stopped_generation_drops_the_tokens_after_the_stop_and_says_stop():
    result = generation_to_wire(generated([1, 2, 3, 4, 5], "length"), Text("ab", 3, True))

    g = result.generation
    assert (g.text, list(g.token_ids), g.finish_reason) == ("ab", [1, 2, 3], "stop")
    assert (g.usage.prompt_tokens, g.usage.completion_tokens, g.usage.cached_tokens) == (5, 3, 2)


def test_an_unstopped_generation_keeps_what_inference_said():
    result = generation_to_wire(generated([1, 2], "length"), Text("ab", 2, False))

    g = result.generation
    assert (g.text, list(g.token_ids), g.finish_reason) == ("ab", [1, 2], "length")
    assert g.usage.completion_tokens == 2
