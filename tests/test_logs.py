from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
from aiohttp import web

from bridge.logs import JsonFormatter, call_logger, configure, escape, formatter
from bridge.service import Service
from tests.conftest import raw_request


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


@pytest.fixture(params=["text", "json"])
def captured(request: pytest.FixtureRequest) -> Iterator[tuple[str, io.StringIO]]:
    """Everything logged (aiohttp's access log included), formatted as sipbridge formats it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(request.param))
    root, access = logging.getLogger(), logging.getLogger("aiohttp.access")
    saved = root.level, access.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    access.setLevel(logging.INFO)
    try:
        yield request.param, stream
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        access.setLevel(saved[1])


async def test_a_request_cannot_forge_a_log_line(
    service: Service, captured: tuple[str, io.StringIO]
) -> None:
    fmt, stream = captured
    # Rejected without a key: the decoded path is logged ("rejected GET /x\n... from ...").
    status, _ = await raw_request(
        service.api_port,
        b"GET /x%0A2026-12-05%2000:00:00,000%20INFO%20forged%E2%80%A8forged%0D%C2%85forged"
        b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert status == 401
    # aiohttp's access log, with a User-Agent holding NEL (U+0085) and a byte that is not UTF-8;
    # it is written before the connection closes, so before raw_request returns.
    runner = web.AppRunner(web.Application())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        status, _ = await raw_request(
            runner.addresses[0][1],
            b"GET /x%0Aforged HTTP/1.1\r\nHost: x\r\nUser-Agent: a\xc2\x85forged\xff\r\n"
            b"Connection: close\r\n\r\n",
        )
        assert status == 404
    finally:
        await runner.cleanup()
    output = stream.getvalue()
    assert output.count("forged") == 5
    record_start = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} " if fmt == "text" else r"\{")
    lines = output.splitlines()  # splits at every line break a reader may honour, U+2028 too
    assert len(lines) >= 2
    for line in lines:
        assert record_start.match(line), line
        if fmt == "json":
            json.loads(line)
    output.encode()  # no lone surrogates: writable as UTF-8


def test_tracebacks_stay_under_their_record() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter("text"))
    logger = logging.getLogger("bridge.tracebacktest")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ValueError("bad\n2026-12-05 00:00:00,000 INFO    forged")
        except ValueError:
            logger.exception("broke on %s", "a\u2028b")
    finally:
        logger.removeHandler(handler)
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith("broke on a\\u2028b")
    assert rest and all(line.startswith("    ") for line in rest)
    assert rest[-1] == "    2026-12-05 00:00:00,000 INFO    forged"


def test_escape() -> None:
    assert escape("a\nb\r\tc\x00\x1b\x7f\x85\u2028\u2029\udcff é") == (
        "a\\nb\\r\\tc\\x00\\x1b\\x7f\\x85\\u2028\\u2029\\udcff é"
    )
