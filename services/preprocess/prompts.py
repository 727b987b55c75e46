"""EncodePrompt's rules: a generation request brings exactly one of a prompt and chat messages,
each message a role and some content, and its prompt plus the tokens it asks for must fit the
model's context. Errors name the field at fault, as clients sent it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fmserve.core.repository import ModelConfig
from fmserve.core.tasks import TaskName
from fmserve.errors import InputTooLong, InvalidInput, WrongTask


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class PromptRequest:
    """What EncodePrompt was asked: one of `prompt` and `messages`."""

    model: str
    version: str = ""
    prompt: str = ""
    messages: Sequence[ChatMessage] = ()
    max_new_tokens: int = 0
    """Tokens the caller will ask for; 0: the model's default."""


def check_task(config: ModelConfig) -> None:
    if config.task is not TaskName.TEXT_GENERATION:
        raise WrongTask(
            f"model {config.name!r} does {config.task}, not text-generation; "
            "`fmserve models` lists each model's task"
        )


def check_prompt(request: PromptRequest) -> None:
    """Exactly one of prompt and messages, and every message whole."""
    if request.prompt and request.messages:
        raise InvalidInput("prompt and messages are both set; send one of them")
    if not request.messages and not request.prompt.strip():
        raise InvalidInput("prompt is empty and there are no messages; send one of them")
    for i, message in enumerate(request.messages):
        if not message.role.strip():
            raise InvalidInput(f"messages[{i}].role is empty; use e.g. 'user' or 'system'")
        if not message.content.strip():
            raise InvalidInput(f"messages[{i}].content is empty; every message needs text")


def check_context(request: PromptRequest, config: ModelConfig, prompt_tokens: int) -> None:
    """The prompt and the tokens to generate must fit the model's context together."""
    wanted = request.max_new_tokens or config.generation.default_max_new_tokens
    if prompt_tokens + wanted <= config.max_length:
        return
    field = "messages" if request.messages else "prompt"
    room = config.max_length - prompt_tokens
    fix = f"ask for at most {room} new tokens, or " if room > 0 else ""
    raise InputTooLong(
        f"{field} is {prompt_tokens} tokens and max_new_tokens is {wanted}: together over model "
        f"{config.name!r}'s context of {config.max_length} tokens; {fix}shorten the {field}"
    )
