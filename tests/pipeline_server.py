"""A real websockets server on 127.0.0.1 playing the conversational pipeline in tests.

It records every session (the start message, the caller's audio as received, control messages)
and runs an optional per-session script (play a tone, send marks, end the call, misbehave).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed


@dataclass
class PipelineSession:
    ws: ServerConnection
    headers: dict[str, str]
    path: str
    start: dict[str, Any] | None = None
    audio: bytearray = field(default_factory=bytearray)
    audio_messages: int = 0
    controls: list[dict[str, Any]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_code: int | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def call_id(self) -> str | None:
        return self.start.get("callId") if self.start else None

    async def wait_for(
        self, predicate: Callable[[PipelineSession], bool], timeout: float = 10.0
    ) -> None:
        async def wait() -> None:
            while not predicate(self):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    async def wait_audio(self, nbytes: int, timeout: float = 10.0) -> bytes:
        await self.wait_for(lambda s: len(s.audio) >= nbytes or s.closed.is_set(), timeout)
        return bytes(self.audio)

    async def wait_control(self, kind: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        def match(message: dict[str, Any]) -> bool:
            return message.get("type", message.get("event")) == kind and all(
                message.get(k) == v for k, v in fields.items()
            )

        await self.wait_for(lambda s: any(match(m) for m in s.controls), timeout)
        return next(m for m in self.controls if match(m))

    async def send(self, message: str | bytes) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(message)

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.send(json.dumps(message))

    async def play(self, pcm: bytes, chunk: int, period_s: float) -> None:
        """Sends ``pcm`` in ``chunk``-byte messages on an absolute schedule of ``period_s``."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for index, offset in enumerate(range(0, len(pcm), chunk)):
            await self.send(pcm[offset : offset + chunk])
            delay = start + (index + 1) * period_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)

    def _note(self) -> None:
        self._changed.set()


Script = Callable[[PipelineSession], Coroutine[Any, Any, None]]


class PipelineServer:
    """Start with ``await server.start()``; ``server.url`` is the websocket URL."""

    def __init__(self, script: Script | None = None, tls: ssl.SSLContext | None = None) -> None:
        """``tls``: serve wss:// with this server context (ws:// without)."""
        self.script = script
        self.tls = tls
        self.sessions: list[PipelineSession] = []
        self.url = ""
        self.refuse = False
        self._server: Server | None = None
        self._arrived = asyncio.Event()

    async def start(self) -> str:
        self._server = await serve(
            self._handle, "127.0.0.1", 0, compression=None, max_size=2**20, ssl=self.tls
        )
        port = next(iter(self._server.sockets)).getsockname()[1]
        self.url = f"{'wss' if self.tls else 'ws'}://127.0.0.1:{port}/pipeline"
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def session(self, index: int = 0, timeout: float = 10.0) -> PipelineSession:
        """The ``index``-th session, once its start message has arrived."""

        async def wait() -> PipelineSession:
            while True:
                if len(self.sessions) > index and self.sessions[index].start is not None:
                    return self.sessions[index]
                self._arrived.clear()
                await self._arrived.wait()

        return await asyncio.wait_for(wait(), timeout)

    def by_call(self, call_id: str) -> PipelineSession | None:
        return next((s for s in self.sessions if s.call_id == call_id), None)

    async def _handle(self, ws: ServerConnection) -> None:
        request = ws.request
        assert request is not None
        session = PipelineSession(
            ws, {k.lower(): v for k, v in request.headers.raw_items()}, request.path
        )
        self.sessions.append(session)
        script_task: asyncio.Task[None] | None = None
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    session.audio += message
                    session.audio_messages += 1
                else:
                    data = json.loads(message)
                    if data.get("type", data.get("event")) in ("start",) and session.start is None:
                        session.start = data
                        self._arrived.set()
                        if self.script is not None:
                            script_task = asyncio.create_task(self.script(session))
                    elif data.get("event") == "media":
                        session.audio += base64.b64decode(data["media"]["payload"])
                        session.audio_messages += 1
                    elif data.get("event") == "connected":
                        pass
                    else:
                        session.controls.append(data)
                session._note()
        except ConnectionClosed:
            pass
        finally:
            session.close_code = ws.close_code
            session.closed.set()
            session._note()
            if script_task is not None and not script_task.done():
                script_task.cancel()
