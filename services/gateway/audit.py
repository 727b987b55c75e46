"""The audit trail: one structured line on the audit logger (`log` below) for every admin
action and every refusal, saying who (key id and name, never the key), what (method and what it
asked), when, and the outcome. With the default JSON log format each is one JSON line."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("fmserve.audit")


def event(
    method: str, outcome: str, key_id: str, key_name: str, asked: Mapping[str, Any]
) -> dict[str, Any]:
    """The audit record: `outcome` is "OK" or the status code the caller got."""
    return {
        "audit": True,
        "method": method,
        "outcome": outcome,
        "key_id": key_id,
        "key_name": key_name,
        "asked": dict(asked),
        "unix_ms": int(time.time() * 1000),
    }


def record(method: str, outcome: str, key_id: str, key_name: str, asked: Mapping[str, Any]) -> None:
    level = logging.INFO if outcome == "OK" else logging.WARNING
    log.log(level, "audit", extra=event(method, outcome, key_id, key_name, asked))
