"""When a sequence ends: the token it just produced is an EOS or a stop token id ("stop"), or
it has its max_new_tokens, or the model's context is full ("length")."""

from __future__ import annotations

STOP = "stop"
LENGTH = "length"
CANCELLED = "cancelled"
"""Not decided here: the scheduler ends the sequences still running when it stops."""


def finish_reason(
    token: int,
    generated: int,
    max_new_tokens: int,
    total_tokens: int,
    context: int,
    stop_ids: frozenset[int],
) -> str | None:
    """Why the sequence ends after `token` (its `generated`-th new token; `total_tokens` with
    the prompt), or None while it goes on. A stop token counts before the length, as in
    transformers: a sequence whose last allowed token is EOS stopped, it did not run out."""
    if token in stop_ids:
        return STOP
    if generated >= max_new_tokens or total_tokens >= context:
        return LENGTH
    return None
