"""The tokenizers of the preprocess service: one per (model, version), loaded on first use from
the model's files, once even when many first requests arrive together; and Tokenize's rules
(texts required, each within the model's maximum length unless the caller asks to truncate).

Loading and tokenizing long batches run in this module's worker threads; short batches are
tokenized inline (see INLINE_MAX_CHARS)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

from fmserve.core.repository import ModelConfig, ModelRepository
from fmserve.errors import FmserveError, InputTooLong, InvalidInput
from services.preprocess import prompts
from services.preprocess.hf_tokenizer import HfTokenizer, Tokenized
from services.preprocess.metrics import REQUEST_TOKENS, TOKENIZER_LOADS

log = logging.getLogger("fmserve.preprocess")

T = TypeVar("T")

# How an error names the text at fault, given its position: a Tokenize caller sent a list, so
# "texts[3]"; a job item is answered alone, so "the text" (see services/preprocess/worker.py).
TextName = Callable[[int], str]


def in_request(index: int) -> str:
    return f"texts[{index}]"


def alone(index: int) -> str:
    return "the text"


# Batches up to this many characters are tokenized on the event loop: tens of microseconds,
# less than handing them to a thread costs. Longer ones go to the worker threads.
INLINE_MAX_CHARS = 4096
# Tokenized once per preloaded model at start: the first call also builds the Rust tokenizer's
# caches, which otherwise the first real request would wait for.
WARM_UP_TEXT = "A sentence to warm up the tokenizer."


class Tokenizers:
    """Owns the loaded tokenizers and the threads that load and run them."""

    def __init__(
        self, repository: ModelRepository, threads: int = 2, preload: Sequence[str] = ()
    ) -> None:
        self.repository = repository
        self.preload = list(preload)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="tokenize")
        # A load in progress is shared by every request that needs it; a failed one is dropped
        # so that the next request tries again.
        self._tokenizers: dict[tuple[str, str], asyncio.Future[HfTokenizer]] = {}

    async def start(self) -> None:
        """Load and warm the preloaded models' tokenizers (the rest load on first use); one that
        fails is logged, not fatal: its requests will say why."""
        for name in self.preload:
            try:
                await self.tokenize(name, "", [WARM_UP_TEXT])
            except FmserveError as exc:  # ConfigError included: a broken model.toml
                log.error("tokenizer preload failed", extra={"model": name, "reason": exc.message})

    async def stop(self) -> None:
        """Called once calls have drained: drop queued work; a running one ends in its thread."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._tokenizers.clear()

    async def tokenize(
        self,
        model: str,
        version: str,
        texts: Sequence[str],
        truncate: bool = False,
        offsets: bool = False,
        name: TextName = in_request,
    ) -> Tokenized:
        """The texts as token ids for `model` at `version` ("" is the default version); an
        error about one text names it with `name`."""
        config = self.repository.get(model)
        version = config.resolve_version(version)
        check_texts(texts, name)
        tokenizer = await self.get(config, version)
        limit = config.max_length if truncate else None
        if sum(map(len, texts)) <= INLINE_MAX_CHARS:
            tokenized = tokenizer.encode(texts, limit, offsets)
        else:
            tokenized = await self._in_thread(partial(tokenizer.encode, texts, limit, offsets))
        check_lengths(tokenized, config, name)
        REQUEST_TOKENS.labels(config.name).observe(tokenized.total_tokens)
        return tokenized

    async def encode_prompt(self, request: prompts.PromptRequest) -> list[int]:
        """A text-generation model's prompt ids (see `prompts` for the rules)."""
        config = self.repository.get(request.model)
        prompts.check_task(config)
        version = config.resolve_version(request.version)
        prompts.check_prompt(request)
        tokenizer = await self.get(config, version)
        if request.messages:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            name = f"model {config.name!r}"
            ids = await self._in_thread(partial(tokenizer.encode_chat, messages, name))
        else:
            ids = tokenizer.encode_prompt(request.prompt)
        prompts.check_context(request, config, len(ids))
        REQUEST_TOKENS.labels(config.name).observe(len(ids))
        return ids

    async def get(self, config: ModelConfig, version: str) -> HfTokenizer:
        """The tokenizer of a model version, loading it on first use."""
        key = (config.name, version)
        loading = self._tokenizers.get(key)
        if loading is None:
            loading = asyncio.ensure_future(self._load(key, config, version))
            # Mark its error as seen: if every caller has gone, nobody else would.
            loading.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._tokenizers[key] = loading
        # A caller that gives up must not cancel a load that other callers wait for.
        return await asyncio.shield(loading)

    async def _load(self, key: tuple[str, str], config: ModelConfig, version: str) -> HfTokenizer:
        try:
            name = f"model {key[0]!r} version {key[1]}"
            # In a thread: for a GGUF source, the first use converts it (a minute, once).
            folder = await self._in_thread(partial(config.files, version))
            tokenizer = await self._in_thread(partial(HfTokenizer.load, folder, name))
        except BaseException:
            self._tokenizers.pop(key, None)
            TOKENIZER_LOADS.labels(key[0], "error").inc()
            raise
        TOKENIZER_LOADS.labels(key[0], "ok").inc()
        log.info("tokenizer loaded", extra={"model": key[0], "version": key[1]})
        return tokenizer

    async def _in_thread(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)


def check_texts(texts: Sequence[str], name: TextName = in_request) -> None:
    """At least one text, and none empty or only whitespace."""
    if not texts:
        raise InvalidInput("texts is empty; send at least one text")
    for index, text in enumerate(texts):
        if not text.strip():
            raise InvalidInput(f"{name(index)} is empty or only whitespace; send some text")


def check_lengths(tokenized: Tokenized, config: ModelConfig, name: TextName = in_request) -> None:
    """Refuse texts longer than the model takes, naming the first and how to fix it."""
    over = (tokenized.lengths > config.max_length).nonzero()[0]
    if not over.size:
        return
    index = int(over[0])
    others = f" (and {over.size - 1} more texts)" if over.size > 1 else ""
    raise InputTooLong(
        f"{name(index)} is {tokenized.lengths[index]} tokens long{others}; model "
        f"{config.name!r} takes at most {config.max_length}. Shorten it, or set truncate "
        f"to cut it to {config.max_length} tokens"
    )
