"""A generation request's prompt and sampling parameters, and the gateway's checks of them: bad
values are refused at the edge, before any stage works, with a message naming the field."""

from __future__ import annotations

from dataclasses import dataclass, replace

from fmserve.core.repository import ModelConfig
from fmserve.errors import InvalidInput
from services.gateway.settings import GatewaySettings


@dataclass(frozen=True)
class Prompt:
    """What to continue: a prompt, or chat messages as (role, content) pairs."""

    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen and when generation stops (gateway.proto's SamplingParameters)."""

    max_new_tokens: int | None = None
    """None: the model's default ([generation] default_max_new_tokens)."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    @property
    def deterministic(self) -> bool:
        """Whether the same request always gives the same tokens: greedy, or seeded."""
        return self.temperature == 0 or self.seed is not None


@dataclass(frozen=True)
class StopLimits:
    max_stop_strings: int
    max_stop_chars: int

    @classmethod
    def of(cls, settings: GatewaySettings) -> StopLimits:
        return cls(settings.max_stop_strings, settings.max_stop_chars)


def check_prompt_size(prompt: Prompt, max_chars: int) -> None:
    """The gateway's bound on what it forwards (token limits are the model's, checked by
    preprocess, which also judges whether the prompt or messages are well formed)."""
    size = len(prompt.prompt) + sum(len(role) + len(content) for role, content in prompt.messages)
    if size > max_chars:
        field = "messages" if prompt.messages else "prompt"
        raise InvalidInput(f"{field} has {size} characters; the limit is {max_chars}")


def checked(sampling: Sampling, config: ModelConfig, limits: StopLimits) -> Sampling:
    """The parameters with max_new_tokens resolved, or InvalidInput naming the first bad one."""
    cap = config.generation.max_new_tokens
    wanted = sampling.max_new_tokens
    if wanted is not None and not 0 < wanted <= cap:
        raise InvalidInput(
            f"max_new_tokens must be 1 to {cap} for model {config.name!r}, got {wanted}"
        )
    if sampling.temperature < 0:
        raise InvalidInput(f"temperature must be >= 0, got {sampling.temperature}")
    if not 0 < sampling.top_p <= 1:
        raise InvalidInput(f"top_p must be in (0, 1], got {sampling.top_p}")
    if sampling.top_k < 0:
        raise InvalidInput(f"top_k must be 0 (all tokens) or positive, got {sampling.top_k}")
    if sampling.repetition_penalty <= 0:
        raise InvalidInput(f"repetition_penalty must be > 0, got {sampling.repetition_penalty}")
    _check_stop(sampling, limits)
    return replace(sampling, max_new_tokens=wanted or config.generation.default_max_new_tokens)


def _check_stop(sampling: Sampling, limits: StopLimits) -> None:
    if len(sampling.stop) > limits.max_stop_strings:
        raise InvalidInput(
            f"stop has {len(sampling.stop)} strings; the limit is {limits.max_stop_strings}"
        )
    for i, stop in enumerate(sampling.stop):
        if not stop:
            raise InvalidInput(f"stop[{i}] is empty; every stop string needs some text")
        if len(stop) > limits.max_stop_chars:
            raise InvalidInput(
                f"stop[{i}] has {len(stop)} characters; the limit is {limits.max_stop_chars}"
            )
    for i, token in enumerate(sampling.stop_token_ids):
        if token < 0:
            raise InvalidInput(f"stop_token_ids[{i}] is {token}; token ids are >= 0")
