"""Result cache keys. A key names everything that changes an answer: model, version, task,
truncation, top-k and the text itself (hashed, so keys stay short and texts stay private)."""

from __future__ import annotations

import hashlib

from services.gateway.routes import Route


def cache_key(route: Route, text: str) -> str:
    digest = hashlib.sha256(
        f"{route.task}\x00{int(route.truncate)}\x00{route.top_k}\x00{text}".encode()
    ).hexdigest()[:40]
    return f"result:{route.model}:{route.version}:{digest}"
