"""A FreeSWITCH Event Socket on 127.0.0.1 that says only what real FreeSWITCH said.

Every byte it sends is a message cut from the captures in tests/data/freeswitch/ (FreeSWITCH
1.10.12, see their README), sent as captured: the greeting, the replies to auth, event, api and
sendmsg commands, and the events of the two captured calls (``CALL_ANSWERED``, which also has
the DTMF events, and ``CALL_RINGING``). The one change a test may ask for is the channel
variable sipbridge's dialplan sets before parking a call, added to a captured CHANNEL_PARK
(:meth:`EslPeer.park`); its Content-Length is recomputed.

What it answers to a command (FreeSWITCH's behaviour in the captures):

- ``auth <password>``: ``+OK accepted``, or ``-ERR invalid``, the disconnect notice and a close;
- ``event plain …``: ``+OK event listener enabled plain``;
- ``api uuid_answer|uuid_kill|uuid_dump|uuid_transfer|uuid_setvar|uuid_send_dtmf <uuid> …``: for
  a channel it has, ``+OK\\n`` (uuid_dump: the captured CHANNEL_DATA); for any other,
  ``-ERR No such channel!\\n``; a uuid_kill also sends that call's hangup events;
- ``api uptime``/``api status``: the captured ``api status`` answer; ``api [expand]
  global_setvar``: ``+OK\n`` (the value is kept, unexpanded, in ``globals``);
- ``sendmsg``: ``+OK``; ``exit``: ``+OK bye``, the disconnect notice, a close.

What FreeSWITCH did live that a replay must not hide (``faults/01`` and ``faults/02``): a
``sendmsg … call-command: unicast`` to a parked channel that was not answered by its own thread
(``sendmsg … execute answer``, or the dialplan's ``answer`` before ``park``) but by
``api uuid_answer`` from outside it, or not answered at all, aborts FreeSWITCH: the unicast's
``+OK`` is the last byte sent, every connection closes and nothing answers any more
(:attr:`EslPeer.crashed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

CAPTURES = Path(__file__).parent / "data" / "freeswitch"
FAULTS = CAPTURES / "faults"
PASSWORD = "ClueCon"
# Parked by the dialplan after its own "answer" (answered in the channel's thread).
CALL_ANSWERED = "b3c872c2-6bbe-4ccf-81fa-c71492244ae0"
# Parked ringing ("ring_ready", "park"), as sipbridge's dialplan parks its offers.
CALL_RINGING = "e7a8cd40-30a1-49c6-9b9d-a178235bb063"
_LENGTH = re.compile(rb"^Content-Length: (\d+)$", re.M)


def split_capture(data: bytes) -> list[bytes]:
    """A capture cut into its messages, each exactly as it was on the wire."""
    messages, offset = [], 0
    while offset < len(data):
        end = data.index(b"\n\n", offset) + 2
        # Searched in a slice: with a start position, ^ would not match there (a message may
        # follow a body that has no newline, as after BACKGROUND_JOB's "42").
        match = _LENGTH.search(data[offset:end])
        end += int(match.group(1)) if match else 0
        messages.append(data[offset:end])
        offset = end
    assert b"".join(messages) == data
    assert all(m.startswith(b"Content-") for m in messages[1:] if not m.startswith(b"Event-Name"))
    return messages


def _body(message: bytes) -> bytes:
    return message.split(b"\n\n", 1)[1]


def _is_event(message: bytes, name: str, uniqueid: str | None = None) -> bool:
    body = _body(message)
    return body.startswith(f"Event-Name: {name}\n".encode()) and (
        uniqueid is None or f"\nUnique-ID: {uniqueid}\n".encode() in body
    )


class Captured:
    """The captured messages the peer draws on."""

    def __init__(self) -> None:
        session = split_capture((CAPTURES / "s1_inbound_plain_all.rx.bin").read_bytes())
        refused = split_capture((CAPTURES / "s1_inbound_bad_password.rx.bin").read_bytes())
        transfer = split_capture((CAPTURES / "s3_inbound_transfer_deflect.rx.bin").read_bytes())
        self.greeting = session[0]
        self.accepted = session[1]
        self.subscribed = session[2]
        self.status = session[3]
        self.refused = refused[1:]  # -ERR invalid, then the disconnect notice
        self.dump = next(m for m in session if _body(m).startswith(b"Event-Name: CHANNEL_DATA"))
        self.no_channel = next(m for m in session if _body(m) == b"-ERR No such channel!\n")
        self.ok_api = next(m for m in session if b"api/response" in m and _body(m) == b"+OK\n")
        self.ok_transfer = next(
            m for m in transfer if b"api/response" in m and _body(m) == b"+OK\n"
        )
        self.ok_command = next(m for m in session if m.endswith(b"Reply-Text: +OK\n\n"))
        # global_setvar answers "+OK" with no newline (faults/01: the heartbeat's replies).
        crash = split_capture(
            (FAULTS / "01-fs-crash-unicast-after-uuid_answer/conn-1.s2c.bin").read_bytes()
        )
        self.ok_setvar = crash[3]
        assert _body(self.ok_setvar) == b"+OK"
        self.bye = next(m for m in session if m.endswith(b"Reply-Text: +OK bye\n\n"))
        self.disconnect = session[-1]
        self.events = [m for m in session if b"text/event-plain" in m.split(b"\n\n", 1)[0]]

    def event(self, name: str, uniqueid: str) -> bytes:
        return next(m for m in self.events if _is_event(m, name, uniqueid))

    def hangup_events(self, uniqueid: str) -> list[bytes]:
        """The captured events from the call's CHANNEL_HANGUP to its CHANNEL_HANGUP_COMPLETE."""
        mine = [m for m in self.events if f"\nUnique-ID: {uniqueid}\n".encode() in m]
        if not any(_is_event(m, "CHANNEL_HANGUP") for m in mine):
            return []  # a channel whose hangup no capture holds: the peer cannot tell it
        first = next(i for i, m in enumerate(mine) if _is_event(m, "CHANNEL_HANGUP"))
        last = next(i for i, m in enumerate(mine) if _is_event(m, "CHANNEL_HANGUP_COMPLETE"))
        return mine[first : last + 1]

    def dtmf_events(self, uniqueid: str) -> list[bytes]:
        return [m for m in self.events if _is_event(m, "DTMF", uniqueid)]


def with_variable(event: bytes, name: str, value: str) -> bytes:
    """A captured plain event with one more channel variable (its lengths recomputed)."""
    head, body = event.split(b"\n\n", 1)
    assert body.endswith(b"\n\n")
    body = body[:-1] + f"variable_{name}: {value}\n\n".encode()
    head = _LENGTH.sub(f"Content-Length: {len(body)}".encode(), head)
    return head + b"\n\n" + body


@dataclass
class EslPeer:
    """The Event Socket server. ``commands`` records every command received, in order."""

    password: str = PASSWORD
    captured: Captured = field(default_factory=Captured)
    port: int = 0
    commands: list[str] = field(default_factory=list)
    connections: int = 0
    # Half-open: accepts and reads, answers nothing (the watchdog must notice).
    silent: bool = False
    refuse: bool = False
    channels: set[str] = field(default_factory=lambda: {CALL_ANSWERED, CALL_RINGING})
    # Channels whose own thread answered them (see the module docstring).
    answered_in_thread: set[str] = field(default_factory=lambda: {CALL_ANSWERED})
    # FreeSWITCH aborted (a unicast on a channel not answered in its own thread).
    crashed: bool = False
    globals: dict[str, str] = field(default_factory=dict)
    on_command: Callable[[str], None] | None = None
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _subscriptions: dict[asyncio.StreamWriter, set[str]] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut(self) -> None:
        """Aborts every connection (FreeSWITCH restarted)."""
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    def send(self, *messages: bytes) -> None:
        """Sends captured messages to every connected client (an event only to those that
        subscribed to it, as FreeSWITCH does)."""
        for writer in self._writers:
            for message in messages:
                if self._wants(writer, message):
                    writer.write(message)

    def _wants(self, writer: asyncio.StreamWriter, message: bytes) -> bool:
        if b"Content-Type: text/event-plain" not in message.split(b"\n\n", 1)[0]:
            return True
        subscribed = self._subscriptions.get(writer, set())
        name = _body(message).split(b"\n", 1)[0].removeprefix(b"Event-Name: ").decode()
        return "ALL" in subscribed or name in subscribed

    def park(self, uniqueid: str, offer_variable: str = "sipbridge_offer") -> None:
        """FreeSWITCH parks a captured call, with sipbridge's dialplan variable set on it."""
        park = self.captured.event("CHANNEL_PARK", uniqueid)
        self.send(with_variable(park, offer_variable, "true"))

    def hang_up(self, uniqueid: str) -> None:
        """The caller hangs up a captured call: its captured hangup events."""
        self.channels.discard(uniqueid)
        self.send(*self.captured.hangup_events(uniqueid))

    @property
    def requests(self) -> list[str]:
        """The commands received, less the watchdog's heartbeats (they come at any time)."""
        return [c for c in self.commands if "global_setvar sipbridge_heartbeat" not in c]

    async def wait_command(self, prefix: str, timeout: float = 10.0) -> str:
        """The first command received that starts with ``prefix`` (waiting for it)."""

        async def wait() -> str:
            while True:
                for command in self.commands:
                    if command.startswith(prefix):
                        return command
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(wait(), timeout)

    async def wait_connections(self, count: int, timeout: float = 10.0) -> None:
        async def wait() -> None:
            while self.connections < count:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    def offer(self, park: bytes) -> str:
        """Sends a captured CHANNEL_PARK as it is and adopts its channel; returns its Unique-ID."""
        body = _body(park)
        uniqueid = re.search(rb"\nUnique-ID: ([0-9a-f-]+)\n", body)
        assert _is_event(park, "CHANNEL_PARK") and uniqueid is not None
        channel = uniqueid.group(1).decode()
        self.channels.add(channel)
        if b"\nAnswer-State: answered\n" in body:
            self.answered_in_thread.add(channel)
        self.send(park)
        return channel

    def _crash(self) -> None:
        """FreeSWITCH aborts: every connection ends, every channel with it."""
        self.crashed = True
        self.channels.clear()
        for writer in self._writers:
            writer.close()  # what was written (the last reply) still goes out first
        self._writers.clear()
        self._changed.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse or self.crashed:
            writer.transport.abort()
            return
        self.connections += 1
        self._changed.set()
        self._writers.append(writer)
        writer.write(self.captured.greeting)
        buffer = b""
        try:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await reader.read(65536):
                    buffer += data
                    while b"\n\n" in buffer:
                        block, buffer = buffer.split(b"\n\n", 1)
                        command = block.decode()
                        self.commands.append(command)
                        self._changed.set()
                        if self.on_command is not None:
                            self.on_command(command)
                        if not self.silent and not self._answer(command, writer):
                            return
        finally:
            with contextlib.suppress(ValueError):
                self._writers.remove(writer)
            self._subscriptions.pop(writer, None)
            writer.close()

    def _answer(self, command: str, writer: asyncio.StreamWriter) -> bool:
        """Writes FreeSWITCH's answer; False when FreeSWITCH would close the connection."""
        captured = self.captured
        words = command.split()
        verb = words[0] if words else ""
        if verb == "auth":
            if command == f"auth {self.password}":
                writer.write(captured.accepted)
                return True
            writer.write(b"".join(captured.refused))
            return False
        if verb == "event":
            self._subscriptions.setdefault(writer, set()).update(words[2:])
            writer.write(captured.subscribed)
        elif verb == "sendmsg":
            writer.write(captured.ok_command)
            return self._sendmsg(command)
        elif verb == "exit":
            writer.write(captured.bye + captured.disconnect)
            return False
        elif verb == "api":
            reply, events = self._api(words[1:])
            writer.write(reply)
            self.send(*events)
        return True

    def _api(self, words: list[str]) -> tuple[bytes, list[bytes]]:
        """The reply to an api command, and the events it makes FreeSWITCH send."""
        captured = self.captured
        name = words[0] if words else ""
        if name in ("uptime", "status"):
            return captured.status, []
        if name == "expand":  # expands ${...} then runs the rest; kept unexpanded here
            name, words = words[1], words[1:]
        if name == "global_setvar":
            self.globals.update([" ".join(words[1:]).partition("=")[::2]])
            return captured.ok_setvar, []
        uniqueid = words[1] if len(words) > 1 else ""
        if uniqueid not in self.channels:
            return captured.no_channel, []
        if name == "uuid_dump":
            return captured.dump, []
        if name == "uuid_kill":
            self.channels.discard(uniqueid)
            return captured.ok_api, captured.hangup_events(uniqueid)
        if name == "uuid_transfer":
            return captured.ok_transfer, []
        # uuid_answer answers from the api thread: the channel stays out of answered_in_thread.
        return captured.ok_api, []

    def _sendmsg(self, command: str) -> bool:
        """Carries out a sendmsg (its +OK is already written); False when FreeSWITCH died."""
        lines = command.split("\n")
        uniqueid = lines[0].removeprefix("sendmsg").strip()
        fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        call_command = fields.get("call-command")
        if uniqueid not in self.channels:
            return True
        if call_command == "execute" and fields.get("execute-app-name") == "answer":
            self.answered_in_thread.add(uniqueid)
        elif call_command == "unicast" and uniqueid not in self.answered_in_thread:
            self._crash()
            return False
        return True
