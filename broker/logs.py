"""Logging set-up: JSON lines when stderr is not a terminal, with a last-line redaction filter."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

from connectors.errors import safe_text


class _Redact(logging.Filter):
    # The broker never logs a token or secret by design; this catches a JWT that some library
    # might put in a message anyway.
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = safe_text(message, limit=4000)
        if cleaned != " ".join(message.split()):
            record.msg, record.args = cleaned, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            # Type only: exception text from libraries may quote request or response bodies.
            entry["exception"] = record.exc_info[0].__name__
        return json.dumps(entry, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def formatException(self, ei: object) -> str:
        exc_type = ei[0] if isinstance(ei, tuple) else None
        return f"({getattr(exc_type, '__name__', 'exception')})"


def setup(level: str = "INFO", json_lines: bool | None = None, stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    if json_lines is None:
        json_lines = not stream.isatty()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if json_lines else PlainFormatter())
    handler.addFilter(_Redact())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # azure-core logs request URLs and headers at INFO; its warnings are enough.
    for noisy in ("azure", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
