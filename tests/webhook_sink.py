"""A real HTTP server on 127.0.0.1 that records every POST and answers as a test scripts it."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Recorded:
    """One request the sink received."""

    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = self.json["message"]
        return message


@dataclass
class Answer:
    """How the sink answers one request."""

    status: int = 200
    body: bytes = b"{}"
    hang: bool = False  # never answer (until the server stops)
    content_type: str = "application/json"


@dataclass
class WebhookSink:
    """Start with ``await sink.start()``; ``sink.url`` is where to POST."""

    requests: list[Recorded] = field(default_factory=list)
    answers: deque[Answer] = field(default_factory=deque)
    default: Answer = field(default_factory=Answer)
    url: str = ""
    tls: ssl.SSLContext | None = None  # serve https:// with this server context
    _runner: web.AppRunner | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def answer(
        self, body: Any = None, *, status: int = 200, raw: bytes | None = None, hang: bool = False
    ) -> None:
        """Queues the answer to the next request (later ones get ``default``)."""
        payload = raw if raw is not None else json.dumps(body if body is not None else {}).encode()
        self.answers.append(Answer(status=status, body=payload, hang=hang))

    async def _handle(self, request: web.Request) -> web.Response:
        recorded = Recorded(request.path, dict(request.headers), await request.read())
        async with self._changed:
            self.requests.append(recorded)
            self._changed.notify_all()
        answer = self.answers.popleft() if self.answers else self.default
        if answer.hang:
            await self._stopping.wait()
        return web.Response(
            status=answer.status, body=answer.body, content_type=answer.content_type
        )

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}/hook"
        return self.url

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(
        self, predicate: Callable[[list[Recorded]], bool], timeout: float = 5.0
    ) -> list[Recorded]:
        """Waits until ``predicate(requests)`` holds; returns the requests."""

        async def check() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self.requests))

        await asyncio.wait_for(check(), timeout)
        return list(self.requests)

    async def wait_for_message(
        self, message_type: str, timeout: float = 5.0, **fields: Any
    ) -> Recorded:
        """The first recorded message of ``message_type`` whose fields match."""

        def match(r: Recorded) -> bool:
            try:
                message = r.message
            except (ValueError, KeyError, TypeError):
                return False
            return message.get("type") == message_type and all(
                message.get(k) == v for k, v in fields.items()
            )

        found = await self.wait_for(lambda rs: any(match(r) for r in rs), timeout)
        return next(r for r in found if match(r))

    def messages(self, message_type: str | None = None) -> list[dict[str, Any]]:
        result = []
        for r in self.requests:
            try:
                message = r.message
            except (ValueError, KeyError, TypeError):
                continue
            if message_type is None or message.get("type") == message_type:
                result.append(message)
        return result
