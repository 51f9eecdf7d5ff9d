from __future__ import annotations

import io
import json
import logging

import pytest

from bridge.logs import JsonFormatter, call_logger, configure


def test_call_logger_names_the_call(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        call_logger(logging.getLogger("bridge.test"), "c-123").info("hello %s", "there")
    assert caplog.records[0].getMessage() == "[call c-123] hello there"
    assert caplog.records[0].call_id == "c-123"  # type: ignore[attr-defined]


def test_json_lines() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("bridge.jsontest")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        call_logger(logger, "c-9").warning("ended: %s", "customer-ended-call")
        try:
            raise ValueError("x")
        except ValueError:
            logger.exception("broke")
    finally:
        logger.removeHandler(handler)
    first, second = (
        json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")
    )
    assert first["level"] == "WARNING" and first["call_id"] == "c-9"
    assert first["message"] == "[call c-9] ended: customer-ended-call"
    assert "ValueError: x" in second["exception"]


def test_configure_replaces_handlers() -> None:
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        configure("WARNING", "json")
        assert len(root.handlers) == 1 and isinstance(root.handlers[0].formatter, JsonFormatter)
        assert root.level == logging.WARNING
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
