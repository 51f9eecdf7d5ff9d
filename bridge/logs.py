"""Logging set-up: plain lines for people or one JSON object per line for log pipelines.

Logged values come from callers (a request path, a SIP header, a pipeline's close reason), so a
record must never be able to start a line of its own: a path of ``/x%0A2026-... INFO forged``
would otherwise write a forged record (CWE-117). Both formatters escape every control character
(C0, DEL, C1), the Unicode line and paragraph separators (U+2028/2029, line breaks to many
readers) and lone surrogates (the undecodable bytes of a header; not writable as UTF-8) in the
whole record, including records of libraries such as aiohttp's access log. A traceback keeps its
lines, each indented under its record.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import MutableMapping
from typing import Any

_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
TRACEBACK_INDENT = "    "


def _escape_code(code: int) -> str:
    if code < 0x100:
        return {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}.get(code, f"\\x{code:02x}")
    return f"\\u{code:04x}"


_UNSAFE_CODES = [
    *range(0x00, 0x20),
    *range(0x7F, 0xA0),
    0x2028,
    0x2029,
    *range(0xD800, 0xE000),
]
# Python's own escapes (\n, \x1b, \u2028): what a reader of the log expects to see.
_TEXT_ESCAPES = {code: _escape_code(code) for code in _UNSAFE_CODES}
# JSON's escapes, for the characters json.dumps(ensure_ascii=False) leaves as they are.
_JSON_ESCAPES = {code: f"\\u{code:04x}" for code in _UNSAFE_CODES}


def escape(text: str) -> str:
    """``text`` on one line: control characters, line separators and surrogates escaped."""
    return text.translate(_TEXT_ESCAPES)


def _indented(traceback: str) -> str:
    """A traceback's lines, each escaped and indented so that none reads as a record."""
    return "".join(f"\n{TRACEBACK_INDENT}{escape(line)}" for line in traceback.split("\n"))


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


class TextFormatter(logging.Formatter):
    """One line per record (plus an indented traceback), every logged value escaped."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        # logging.Formatter.format, with the record's line escaped and the traceback indented
        # (and not cached on the record, where other handlers would find it indented).
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        text = escape(self.formatMessage(record))
        if record.exc_info:
            text += _indented(self.formatException(record.exc_info))
        if record.stack_info:
            text += _indented(self.formatStack(record.stack_info))
        return text


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
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # json.dumps escapes C0 but not DEL, C1, U+2028/2029, nor lone surrogates.
        return json.dumps(entry, ensure_ascii=False).translate(_JSON_ESCAPES)


def formatter(fmt: str) -> logging.Formatter:
    """The formatter of ``fmt`` ("text" or "json")."""
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure(level: str, fmt: str) -> None:
    """Sends sipbridge's logs to stderr at ``level`` in ``fmt`` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # aiohttp's access log repeats what /metrics counts; keep it at warnings.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
