"""A loopback AMI server for the adapter's failure tests, speaking Asterisk 22's own messages.

Every response and event it sends is a message captured from Asterisk 22.10.1 running the
project's dialplan (tests/data/ami_*.bin, ami_offer_event.txt); only the ActionID, and where a
test needs it the channel fields, are substituted. Real Asterisk cannot be made to split a UTF-8
character across TCP reads, go silent on a live socket, or leave an action unanswered on cue;
this peer can.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DATA = Path(__file__).parent / "data"
BANNER = b"Asterisk Call Manager/11.0.0\r\n"


def _field(line: str) -> tuple[str, str]:
    key, _, value = line.partition(": ")
    return key.rstrip(":"), value


def _messages(raw: bytes) -> list[list[tuple[str, str]]]:
    text = raw.decode("utf-8")
    if text.startswith("Asterisk Call Manager"):
        text = text.split("\r\n", 1)[1]
    return [
        [_field(line) for line in block.split("\r\n")]
        for block in text.split("\r\n\r\n")
        if block.strip()
    ]


_SESSION = _messages((DATA / "ami_session.rx.bin").read_bytes())
_REFUSED = _messages((DATA / "ami_login_refused.rx.bin").read_bytes())
_OFFER = _messages((DATA / "ami_offer_event.txt").read_bytes())[0]
# PlayDTMF on a ringing channel and on a missing one (Asterisk 22.10.1).
_PLAYDTMF = _messages((DATA / "ami_playdtmf.rx.bin").read_bytes())
# Filter by a user with write = all, and by the sample's user without "system" (Asterisk 22.10.1).
_FILTER = _messages((DATA / "ami_filter.rx.bin").read_bytes())
_FILTER_REFUSED = _messages((DATA / "ami_filter_refused.rx.bin").read_bytes())


def _by_action_id(action_id: str) -> list[list[tuple[str, str]]]:
    return [m for m in _SESSION if ("ActionID", action_id) in m]


TEMPLATES = {
    "login-ok": _by_action_id("login-1")[0],
    "login-refused": _REFUSED[0],
    "setvar-ok": _by_action_id("hb-2")[0],
    "no-such-channel": _by_action_id("set-bad")[0],
    "redirect-missing": _by_action_id("redirect-bad")[0],
    "pjsiphangup-ok": _by_action_id("reject-1")[0],
    "ping": _by_action_id("ping-1")[0],
    "playdtmf-ok": next(m for m in _PLAYDTMF if ("ActionID", "dtmf-1") in m),
    "playdtmf-missing": next(m for m in _PLAYDTMF if ("ActionID", "dtmf-bad") in m),
    "logoff": _by_action_id("logoff-1")[0],
    "filter-ok": next(m for m in _FILTER if ("ActionID", "filter-1") in m),
    "filter-denied": next(m for m in _FILTER_REFUSED if ("ActionID", "filter-1") in m),
    "show-start": _by_action_id("show-1")[0],
    "show-row": _by_action_id("show-1")[1],
    "show-complete": _by_action_id("show-1")[-1],
}
HANGUP_EVENT = next(m for m in _SESSION if ("Event", "Hangup") in m)
OFFER_EVENT = _OFFER


def render(message: list[tuple[str, str]], **replace: str) -> bytes:
    """A captured message with some field values replaced."""
    lines = [f"{key}: {replace.get(key, value)}" for key, value in message]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


@dataclass
class Connection:
    writer: asyncio.StreamWriter
    logged_in: bool = False


@dataclass
class AmiPeer:
    """Start with ``await peer.start()``; configure behaviour through its attributes."""

    secret: str = "s3cret"
    port: int = 0
    logins: int = 0
    actions: list[dict[str, str]] = field(default_factory=list)
    connections: list[Connection] = field(default_factory=list)
    channels: list[dict[str, str]] = field(default_factory=list)
    silent: bool = False  # answer nothing, keep the socket open
    unanswered: set[str] = field(default_factory=set)  # action names never answered
    # Action names that make the peer abort the connection instead of answering, once each:
    # the link dies exactly while the adapter sends that action.
    drop_on: set[str] = field(default_factory=set)
    accepting: bool = True  # False: new connections are aborted before the banner
    # Accept the login, then abort the connection when the next action arrives.
    drop_after_login: bool = False
    refused_delay_s: float = 0.05  # Asterisk waits 1 s before refusing a login
    # The user may set session filters (write = system); the shipped sample's may not.
    may_filter: bool = False
    # Action name -> seconds the peer holds the whole event loop right after answering it: a
    # busy machine, where the answer waits in the socket while the loop runs late.
    stall_after: dict[str, float] = field(default_factory=dict)
    _server: asyncio.Server | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.drop_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def drop_all(self) -> None:
        for connection in self.connections:
            connection.writer.transport.abort()
        self.connections.clear()

    async def wait_for(self, predicate: Callable[[AmiPeer], bool], timeout: float = 5.0) -> None:
        async def wait() -> None:
            while not predicate(self):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    def actions_named(self, name: str) -> list[dict[str, str]]:
        return [a for a in self.actions if a.get("Action", "").lower() == name.lower()]

    async def send(
        self, data: bytes, *, split_at: int | None = None, pause_s: float = 0.05
    ) -> None:
        """Sends raw bytes to every logged-in client, optionally in two writes."""
        for connection in list(self.connections):
            if not connection.logged_in:
                continue
            if split_at is None:
                connection.writer.write(data)
            else:
                connection.writer.write(data[:split_at])
                await connection.writer.drain()
                await asyncio.sleep(pause_s)  # two TCP segments on purpose; noqa: sleep-ok
                connection.writer.write(data[split_at:])
            await connection.writer.drain()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.transport.abort()
            return
        connection = Connection(writer)
        self.connections.append(connection)
        writer.write(BANNER)
        buffer = b""
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                buffer += chunk
                while b"\r\n\r\n" in buffer:
                    block, buffer = buffer.split(b"\r\n\r\n", 1)
                    action = dict(
                        line.split(": ", 1) for line in block.decode().split("\r\n") if ": " in line
                    )
                    self.actions.append(action)
                    self._changed.set()
                    await self._answer(connection, action)
                    stall_s = self.stall_after.get(action.get("Action", "").lower())
                    if stall_s:
                        time.sleep(stall_s)  # noqa: ASYNC251 - holding the loop is the point
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            with contextlib.suppress(ValueError):
                self.connections.remove(connection)
            writer.close()

    async def _answer(self, connection: Connection, action: dict[str, str]) -> None:
        name = action.get("Action", "").lower()
        action_id = action.get("ActionID", "")
        writer = connection.writer
        if name == "login":
            self.logins += 1
            self._changed.set()
            if action.get("Secret") != self.secret:
                await asyncio.sleep(self.refused_delay_s)
                writer.write(render(TEMPLATES["login-refused"], ActionID=action_id))
                writer.close()
                return
            connection.logged_in = True
            writer.write(render(TEMPLATES["login-ok"], ActionID=action_id))
            return
        if name in self.drop_on or self.drop_after_login:
            self.drop_on.discard(name)
            writer.transport.abort()
            return
        if self.silent or name in self.unanswered:
            return
        if name == "coreshowchannels":
            writer.write(render(TEMPLATES["show-start"], ActionID=action_id))
            for channel in self.channels:
                writer.write(render(TEMPLATES["show-row"], ActionID=action_id, **channel))
            writer.write(
                render(
                    TEMPLATES["show-complete"],
                    ActionID=action_id,
                    ListItems=str(len(self.channels)),
                )
            )
        elif name == "playdtmf":
            known = any(c.get("Channel") == action.get("Channel") for c in self.channels)
            template = "playdtmf-ok" if known else "playdtmf-missing"
            writer.write(render(TEMPLATES[template], ActionID=action_id))
        elif name == "setvar":
            target = action.get("Channel")
            known = target is None or any(c.get("Channel") == target for c in self.channels)
            writer.write(
                render(TEMPLATES["setvar-ok" if known else "no-such-channel"], ActionID=action_id)
            )
        elif name == "redirect":
            known = any(c.get("Channel") == action.get("Channel") for c in self.channels)
            template = "setvar-ok" if known else "redirect-missing"
            writer.write(
                render(TEMPLATES[template], ActionID=action_id, Message="Redirect successful")
            )
        elif name in ("hangup", "pjsiphangup"):
            known = any(c.get("Channel") == action.get("Channel") for c in self.channels)
            writer.write(
                render(
                    TEMPLATES["pjsiphangup-ok" if known else "no-such-channel"], ActionID=action_id
                )
            )
        elif name == "ping":
            writer.write(render(TEMPLATES["ping"], ActionID=action_id))
        elif name == "filter":
            template = "filter-ok" if self.may_filter else "filter-denied"
            writer.write(render(TEMPLATES[template], ActionID=action_id))
        elif name == "logoff":
            writer.write(render(TEMPLATES["logoff"], ActionID=action_id))
            writer.close()
