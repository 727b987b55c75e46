"""EncodePrompt's domain: a tiny Llama's real tokenizer and ChatML template from the test
repository, compared with what transformers gives in-process; every bad input named."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from fmserve.core.repository import ModelRepository
from fmserve.errors import InputTooLong, InvalidInput, WrongTask
from services.preprocess.prompts import ChatMessage, PromptRequest
from services.preprocess.tokenizers import Tokenizers

CHAT = (ChatMessage("system", "You reverse text."), ChatMessage("user", "Say hello 123"))


@pytest.fixture(scope="module")
async def tokenizers(model_repository: Path):
    tokenizers = Tokenizers(ModelRepository(model_repository), threads=1)
    yield tokenizers
    await tokenizers.stop()


@pytest.fixture(scope="module")
def reference(model_repository: Path):
    return AutoTokenizer.from_pretrained(model_repository / "tiny-llama" / "1")


async def test_a_prompt_is_tokenized_as_transformers_does(tokenizers, reference):
    ids = await tokenizers.encode_prompt(PromptRequest("tiny-llama", prompt="def generate(x):"))

    assert ids == reference("def generate(x):")["input_ids"]


async def test_messages_go_through_the_chat_template_with_the_assistant_turn_open(
    tokenizers, reference
):
    ids = await tokenizers.encode_prompt(PromptRequest("tiny-llama", messages=CHAT))

    messages = [{"role": m.role, "content": m.content} for m in CHAT]
    expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ids == list(expected["input_ids"])
    assert reference.decode(ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (PromptRequest("tiny-llama"), "prompt is empty and there are no messages"),
        (PromptRequest("tiny-llama", prompt="   "), "prompt is empty"),
        (PromptRequest("tiny-llama", prompt="hi", messages=CHAT), "prompt and messages are both"),
        (PromptRequest("tiny-llama", messages=(ChatMessage("", "hi"),)), "messages[0].role"),
        (
            PromptRequest("tiny-llama", messages=(*CHAT, ChatMessage("user", " "))),
            "messages[2].content",
        ),
    ],
)
async def test_bad_prompts_are_refused_naming_the_field(tokenizers, request_, field):
    with pytest.raises(InvalidInput, match=f"^{field}".replace("[", r"\[").replace("]", r"\]")):
        await tokenizers.encode_prompt(request_)


async def test_prompt_and_new_tokens_over_the_context_are_refused(tokenizers, reference):
    prompt = "hello world " * 40
    tokens = len(reference(prompt)["input_ids"])
    assert tokens < 256 < tokens + 128  # the tiny models' context, and their cap

    fits = PromptRequest("tiny-llama", prompt=prompt, max_new_tokens=256 - tokens)
    assert len(await tokenizers.encode_prompt(fits)) == tokens
    with pytest.raises(InputTooLong, match=rf"^prompt is {tokens} tokens and max_new_tokens is"):
        await tokenizers.encode_prompt(
            PromptRequest("tiny-llama", prompt=prompt, max_new_tokens=128)
        )


async def test_the_default_max_new_tokens_counts_when_none_is_given(tokenizers, reference):
    prompt = "hello world " * 200  # alone over the 256-token context
    with pytest.raises(InputTooLong, match="max_new_tokens is 16: together over"):
        await tokenizers.encode_prompt(PromptRequest("tiny-llama", prompt=prompt))


async def test_an_encoder_cannot_take_a_prompt(tokenizers):
    with pytest.raises(WrongTask, match="does embedding, not text-generation"):
        await tokenizers.encode_prompt(PromptRequest("minilm-embed", prompt="hello"))
