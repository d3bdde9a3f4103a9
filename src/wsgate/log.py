"""Structured logging: one JSON object a line, or text.

Log records name connections by session id and a hash of the subject; tokens,
``Authorization`` values and query strings are never passed to a logger.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

FIELDS = ("event", "session", "subject", "peer", "code", "status", "outcome", "reason", "run_id")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extras = " ".join(
            f"{name}={record.__dict__[name]}" for name in FIELDS if record.__dict__.get(name) is not None
        )
        line = f"{stamp} {record.levelname:<7} {record.getMessage()}" + (f" [{extras}]" if extras else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("wsgate")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
