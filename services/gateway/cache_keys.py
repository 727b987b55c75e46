"""Result cache keys. A key names everything that changes an answer: model, version, task,
truncation, top-k and the text itself (or a media item's bytes and how to read them), or for a
generation its prompt and every sampling parameter (hashed, so keys stay short and inputs stay
private). Preprocessing settings are the model version's own files, named by its version."""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields

from services.gateway.media import Media
from services.gateway.routes import Route
from services.gateway.sampling import Prompt, Sampling


def cache_key(route: Route, text: str) -> str:
    digest = hashlib.sha256(
        f"{route.task}\x00{int(route.truncate)}\x00{route.top_k}\x00{text}".encode()
    ).hexdigest()[:40]
    return f"result:{route.model}:{route.version}:{digest}"


def media_key(route: Route, media: Media) -> str:
    """A media item's key: its digest (bytes, MIME type, sample format) with the route's
    options; "media" keeps it apart from a text that happened to equal the digest."""
    parts = f"{route.task}\x00media\x00{route.top_k}\x00{media.digest}"
    digest = hashlib.sha256(parts.encode()).hexdigest()[:40]
    return f"result:{route.model}:{route.version}:{digest}"


def generation_key(route: Route, prompt: Prompt, sampling: Sampling) -> str:
    """A deterministic generation's key: the model version, the prompt or messages, and every
    parameter that changes the tokens or the text (stop strings and ids too). max_new_tokens
    is the resolved value, so a default that changes later gives a new key."""
    parts = {
        "prompt": prompt.prompt,
        "messages": [list(m) for m in prompt.messages],
        **{f.name: getattr(sampling, f.name) for f in fields(sampling)},
    }
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(f"{route.task}\x00{text}".encode()).hexdigest()[:40]
    return f"result:{route.model}:{route.version}:{digest}"
