"""A TCP proxy on 127.0.0.1 that a test can cut (kill live connections), block (refuse new) or
freeze (keep connections open but let nothing through: a half-open link, a NAT that forgot it),
or arm with an :class:`AmiTrap` that cuts an AMI link at one chosen action."""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass, field
from typing import Literal

_END = b"\r\n\r\n"
_ACTION_ID = re.compile(rb"^ActionID: *(\S+)\r?$", re.MULTILINE | re.IGNORECASE)


@dataclass
class AmiTrap:
    """Cuts the link at the ``nth`` AMI action that contains ``marker``.

    ``lose="action"``: the action never reaches Asterisk (what was sent before it does).
    ``lose="answer"``: Asterisk gets the action and answers it, and the answer is lost with
    the link: the case where the sender cannot know whether it was carried out.
    """

    marker: bytes
    nth: int = 1
    lose: Literal["action", "answer"] = "answer"
    seen: int = 0
    # The ActionID whose answer is to be lost, once the action went through.
    answer_of: bytes | None = None
    sprung: asyncio.Event = field(default_factory=asyncio.Event)

    def matches(self, message: bytes) -> bool:
        if self.sprung.is_set() or self.answer_of is not None or self.marker not in message:
            return False
        self.seen += 1
        return self.seen == self.nth


class TcpProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.blocked = False
        self.frozen = False
        self.connections = 0
        self.trap: AmiTrap | None = None
        self._server: asyncio.Server | None = None
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def arm(self, trap: AmiTrap) -> AmiTrap:
        """Cuts the live AMI link at the action ``trap`` describes (once)."""
        self.trap = trap
        return trap

    def cut(self) -> None:
        """Aborts every live connection (both sides see a dead link)."""
        for client, upstream in self._pairs:
            client.transport.abort()
            upstream.transport.abort()
        self._pairs.clear()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._pairs.append((writer, up_writer))
        pipes = (self._pipe_up(reader, up_writer), self._pipe_down(up_reader, writer))
        for pipe in pipes:
            task = asyncio.create_task(pipe)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _spring(self, trap: AmiTrap) -> None:
        trap.sprung.set()
        self.cut()

    async def _pipe_up(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Client to Asterisk, whole actions at a time (an armed trap looks at each)."""
        pending = b""
        with contextlib.suppress(ConnectionError, OSError):
            while data := await source.read(65536):
                if self.frozen:
                    continue  # lost, as on a dead path; nobody is told
                pending += data
                complete, _, pending = pending.rpartition(_END)
                if not complete:
                    continue
                out = b""
                for message in (complete + _END).split(_END)[:-1]:
                    trap = self.trap
                    if trap is not None and trap.matches(message):
                        if trap.lose == "action":
                            sink.write(out)
                            await sink.drain()
                            self._spring(trap)
                            return
                        found = _ACTION_ID.search(message)
                        assert found is not None, message
                        trap.answer_of = found.group(1)
                    out += message + _END
                sink.write(out)
                await sink.drain()
        sink.close()

    async def _pipe_down(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Asterisk to client; an armed trap drops the answer it waits for, and cuts."""
        held = b""  # while a trap waits for its answer: the last, incomplete message
        with contextlib.suppress(ConnectionError, OSError):
            while data := await source.read(65536):
                if self.frozen:
                    continue
                trap = self.trap
                if trap is None or trap.answer_of is None or trap.sprung.is_set():
                    sink.write(held + data)
                    held = b""
                    await sink.drain()
                    continue
                held += data
                answer = re.compile(
                    rb"^ActionID: *" + re.escape(trap.answer_of) + rb"\r?$", re.M | re.I
                )
                found = answer.search(held)
                if found is not None:
                    # Everything before the answer goes through; the answer does not.
                    start = held.rfind(_END, 0, found.start())
                    sink.write(held[: start + len(_END)] if start >= 0 else b"")
                    await sink.drain()
                    self._spring(trap)
                    return
                complete, _, held = held.rpartition(_END)
                if complete:
                    sink.write(complete + _END)
                    await sink.drain()
        sink.close()
