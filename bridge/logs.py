"""Logging set-up: plain lines for people or one JSON object per line for log pipelines."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import MutableMapping
from typing import Any

_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class CallLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the call id and attaches it for JSON logs."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        call_id = (self.extra or {}).get("call_id", "?")
        kwargs.setdefault("extra", {})["call_id"] = call_id
        return f"[call {call_id}] {msg}", kwargs


def call_logger(logger: logging.Logger, call_id: str) -> CallLogger:
    """A logger whose lines name ``call_id``."""
    return CallLogger(logger, {"call_id": call_id})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, call_id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        call_id = getattr(record, "call_id", None)
        if call_id is not None:
            entry["call_id"] = call_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, fmt: str) -> None:
    """Sends sipbridge's logs to stderr at ``level`` in ``fmt`` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # aiohttp's access log repeats what /metrics counts; keep it at warnings.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
