"""Structured logging: one JSON object per line, with the request id of the call being served
(bound in a contextvar by the request-id interceptor) on every line logged during it."""

from __future__ import annotations

import json
import logging
import sys
import time

from fmserve.core.context import request_id

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Renders a record and its `extra=` fields as one JSON line (json.dumps does the quoting)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if rid := request_id.get():
            event["request_id"] = rid
        event.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


def configure(service: str, level: str = "INFO", fmt: str = "json") -> None:
    """Route every logger to stderr in the chosen format; call once, from a service's main."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
