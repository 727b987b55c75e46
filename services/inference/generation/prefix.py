"""Prefix reuse: the KV cache of recent prompts, so that a prompt starting with the same tokens
(a shared system prompt, a chat template's preamble) prefills only the rest.

Attention is causal: the keys and values of a prompt's first n tokens depend on those n tokens
only, so any stored prompt serves every later prompt that shares its first n tokens, whatever
follows. Entries are whole prompts, least recently used first out, bounded in tokens
(`[generation] prefix_cache_tokens`, apart from the running sequences' KV budget). Used from the
scheduler between model calls and in its executor call, never both at once.
"""

from __future__ import annotations

from collections import OrderedDict

from services.inference.generation.batch import Layers

MIN_REUSE = 16
"""Fewer shared tokens are not worth padding the batch's prefix for."""


class PrefixCache:
    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.tokens = 0
        self._entries: OrderedDict[tuple[int, ...], Layers] = OrderedDict()

    def find(self, prompt: tuple[int, ...]) -> Layers | None:
        """The KV of the longest stored prefix of `prompt` (one token at least is left to
        prefill: its logits give the first new token), or None."""
        best, shared = None, MIN_REUSE - 1
        for ids in self._entries:
            common = min(_shared(ids, prompt), len(prompt) - 1)
            if common > shared:
                best, shared = ids, common
        if best is None:
            return None
        self._entries.move_to_end(best)
        return [(k[:, :, :shared], v[:, :, :shared]) for k, v in self._entries[best]]

    def add(self, prompt: tuple[int, ...], layers: Layers) -> None:
        """Keep a prompt's KV ([1, heads, len(prompt), dim] per layer, owned by the cache),
        dropping the entries it covers and the least recently used beyond the bound."""
        if len(prompt) < MIN_REUSE or len(prompt) > self.max_tokens:
            return
        for ids in list(self._entries):
            if ids[: len(prompt)] == prompt:  # a longer one already serves it
                self._entries.move_to_end(ids)
                return
            if prompt[: len(ids)] == ids:
                self._drop(ids)
        while self.tokens + len(prompt) > self.max_tokens:
            self._drop(next(iter(self._entries)))
        self._entries[prompt] = layers
        self.tokens += len(prompt)

    def _drop(self, ids: tuple[int, ...]) -> None:
        del self._entries[ids]
        self.tokens -= len(ids)


def _shared(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """How many first tokens two prompts share."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )
