"""A generation request's parameters, checked against its model: each bad value is refused with
INVALID_ARGUMENT naming the parameter, before the request takes any room in the batch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fmserve.core.repository import ModelConfig
from fmserve.errors import InputTooLong, InvalidInput


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen; the defaults are greedy decoding."""

    temperature: float = 0.0
    """0 picks the most likely token (greedy); above 0 samples from the softened distribution."""
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k filter."""
    repetition_penalty: float = 1.0
    seed: int | None = None
    """None: nondeterministic sampling."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int | None = None
    """None: the model's [generation] default_max_new_tokens."""
    sampling: Sampling = Sampling()
    stop_token_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Checked:
    """A request the model can run: its limits resolved."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: Sampling
    stop_token_ids: frozenset[int]

    @property
    def reserved_tokens(self) -> int:
        """KV-cache slots this sequence may fill: what admission reserves for it."""
        return len(self.prompt_ids) + self.max_new_tokens


def check(request: GenerationRequest, config: ModelConfig, vocab_size: int) -> Checked:
    """The request with its defaults filled in; InvalidInput names the first bad parameter."""
    _check_sampling(request.sampling)
    _check_ids("input_ids", request.prompt_ids, vocab_size, allow_empty=False)
    _check_ids("stop_token_ids", tuple(request.stop_token_ids), vocab_size, allow_empty=True)
    max_new = _max_new_tokens(request.max_new_tokens, config)
    context = config.max_length
    if len(request.prompt_ids) + max_new > context:
        raise InputTooLong(
            f"the prompt has {len(request.prompt_ids)} tokens and max_new_tokens is {max_new}: "
            f"together over model {config.name!r}'s context of {context} tokens; shorten the "
            "prompt or ask for fewer new tokens"
        )
    return Checked(request.prompt_ids, max_new, request.sampling, request.stop_token_ids)


def _max_new_tokens(requested: int | None, config: ModelConfig) -> int:
    cap = config.generation.max_new_tokens
    if requested is None:
        return config.generation.default_max_new_tokens
    if not 0 < requested <= cap:
        raise InvalidInput(
            f"max_new_tokens must be in [1, {cap}] for model {config.name!r}, got {requested}"
        )
    return requested


def _check_sampling(sampling: Sampling) -> None:
    finite = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "repetition_penalty": sampling.repetition_penalty,
    }
    for name, value in finite.items():
        if not math.isfinite(value):
            raise InvalidInput(f"{name} must be a finite number, got {value}")
    if sampling.temperature < 0:
        raise InvalidInput(f"temperature must be >= 0, got {sampling.temperature:g}")
    if not 0 < sampling.top_p <= 1:
        raise InvalidInput(f"top_p must be in (0, 1], got {sampling.top_p:g}")
    if sampling.top_k < 0:
        raise InvalidInput(f"top_k must be >= 0, got {sampling.top_k}")
    if sampling.repetition_penalty <= 0:
        raise InvalidInput(f"repetition_penalty must be > 0, got {sampling.repetition_penalty:g}")
    if sampling.seed is not None and sampling.seed < 0:
        raise InvalidInput(f"seed must be >= 0, got {sampling.seed}")


def _check_ids(name: str, ids: tuple[int, ...], vocab_size: int, allow_empty: bool) -> None:
    if not ids and not allow_empty:
        raise InvalidInput(f"{name} is empty: a prompt needs at least one token")
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        raise InvalidInput(
            f"{name} must lie in [0, {vocab_size}); tokenize with the model's own tokenizer"
        )
