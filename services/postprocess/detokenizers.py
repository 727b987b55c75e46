"""The postprocess service's detokenizers: one decoder per text-generation model version,
loaded on first use from the model's tokenizer files (off the event loop, once even when many
first streams arrive together), and a fresh `Detokenizer` per generated sequence."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from tokenizers import Tokenizer
from transformers import AutoTokenizer

from fmserve.core.repository import ModelConfig, ModelRepository
from fmserve.core.tasks import TaskName
from fmserve.errors import FmserveError, WrongTask
from services.postprocess.detokenizer import Detokenizer

log = logging.getLogger("fmserve.postprocess")


class Detokenizers:
    """Owns the loaded tokenizers (their decode side)."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository
        self._loaded: dict[tuple[str, str], asyncio.Future[Tokenizer]] = {}

    async def open(self, model: str, version: str, stop: Sequence[str]) -> Detokenizer:
        """A detokenizer for one sequence of `model` at `version`, stopping at `stop`."""
        config = self.repository.get(model)
        if config.task is not TaskName.TEXT_GENERATION:
            raise WrongTask(f"model {model!r} does {config.task}, not text-generation")
        version = config.resolve_version(version)
        key = (config.name, version)
        loading = self._loaded.get(key)
        if loading is None:
            # In a thread, files() included: for a GGUF source the first use converts it (once).
            loading = asyncio.ensure_future(asyncio.to_thread(_load, config, version, key))
            loading.add_done_callback(lambda f: self._forget_failed(key, f))
            self._loaded[key] = loading
        tokenizer = await asyncio.shield(loading)  # a caller that leaves must not cancel a load

        def decode(ids: Sequence[int]) -> str:
            return tokenizer.decode(list(ids), skip_special_tokens=True)

        return Detokenizer(decode, stop)

    def _forget_failed(self, key: tuple[str, str], loading: asyncio.Future[Tokenizer]) -> None:
        """A failed load is dropped, so the next stream tries again (its error is retrieved)."""
        if loading.cancelled() or loading.exception() is not None:
            self._loaded.pop(key, None)

    async def start(self) -> None:
        """Nothing to start: tokenizers load on first use."""

    async def stop(self) -> None:
        self._loaded.clear()


def _load(config: ModelConfig, version: str, key: tuple[str, str]) -> Tokenizer:
    """The model's fast tokenizer, from local files only (no hub, no remote code). Errors name
    the model, never the folder: they reach clients."""
    folder = config.files(version)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False
        )
        return tokenizer.backend_tokenizer
    except Exception as exc:  # any failure here means the model's files cannot be used
        log.exception("cannot load the tokenizer of %s version %s from %s", *key, folder)
        raise FmserveError(
            f"cannot load the tokenizer of model {key[0]!r}; the postprocess log says why"
        ) from exc
