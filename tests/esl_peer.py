"""A FreeSWITCH Event Socket on 127.0.0.1 that says only what real FreeSWITCH said.

Every byte it sends is a message cut from the captures in ``tests/data/freeswitch/`` (FreeSWITCH
1.10.12, see their README), sent as captured. The calls it knows are the channels of the live
captures (``live/``, sipbridge's own adapter against a live FreeSWITCH, JSON events): each with
its CHANNEL_PARK as sipbridge's dialplan parked it, and what FreeSWITCH sent for it later (its
DTMF, the bridge or the re-park of a transfer, its hangup as the caller or FreeSWITCH ended it).
The peer sends a channel's events when the test plays the caller (:meth:`EslPeer.park`,
:meth:`EslPeer.press`, :meth:`EslPeer.hang_up`, :meth:`EslPeer.shut_down`) or when a command
makes FreeSWITCH send them (a transfer's outcome, the hangup after a ``uuid_kill``).

What it answers to a command (FreeSWITCH's behaviour in the captures):

- ``auth <password>``: ``+OK accepted``, or ``-ERR invalid``, the disconnect notice and a close;
- ``event json|plain …``: ``+OK event listener enabled json|plain``; events then go only to
  connections subscribed to them;
- ``api [expand] global_setvar``: ``+OK`` (three bytes); ``api status``: the captured answer;
- ``api uuid_exists <uuid>``: ``true`` while the peer holds the channel, else ``false``;
- ``api show channels as json``: the captured listing of the one call parked while sipbridge
  was away (:attr:`EslPeer.parked_unseen`), else the captured empty listing;
- ``api uuid_dump <uuid> json``: that call's captured dump, else ``-ERR No such channel!``;
- ``api uuid_setvar|uuid_transfer …``: ``+OK``; a transfer then brings the channel's captured
  outcome (CHANNEL_BRIDGE, or the CHANNEL_PARK with ``sipbridge_transfer_failed``);
- ``api uuid_kill <uuid>``: ``+OK`` and the channel's captured hangup by FreeSWITCH;
  ``api uuid_send_dtmf``: the captured ``+OK <uuid> sent DTMF <digits>.`` with the call's
  uuid and digits put in (the one reply the peer fills in);
- ``sendmsg``: ``+OK``; a ``hangup`` then brings the channel's captured hangup by FreeSWITCH;
- any command about a channel the peer does not hold: FreeSWITCH's ``-ERR No such channel!``;
- ``exit``: ``+OK bye``, the disconnect notice, a close.

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
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CAPTURES = Path(__file__).parent / "data" / "freeswitch"
FAULTS = CAPTURES / "faults"
LIVE = CAPTURES / "live"
PASSWORD = "ClueCon"

# The live captures' calls (tests/data/freeswitch/live/README.md says what happened to each).
CALL = "ecca0300-0efc-45ee-9f9f-2c73086da0aa"  # X- headers, DTMF 1 2 #, the caller's BYE
TRANSFER_OK = "d96af709-35eb-4e5b-a947-5c5e06a32ca0"  # answered; bridged by a transfer
TRANSFER_FAILS = "b2b54656-f73d-4654-9297-8a8a24528d7a"  # answered; its bridge fails, re-parked
SHUTDOWN = "03510541-e746-4f77-b772-c8177b8be833"  # answered; FreeSWITCH shut down
REFUSED = "20a94da3-18f8-45c8-be55-7a150dd05195"  # ringing; refused (respond, hangup)
UNSEEN = "4b364964-615a-4adf-93f9-e97db2f1381d"  # parked while sipbridge was away
ORPHAN = "282558d0-d4d4-4efc-b659-5afc040ef86d"  # answered; its sipbridge was killed
RINGING_TRANSFER_OK = "d362a787-74f5-420f-b71d-8f6086e3b7b1"  # ringing; bridged by a transfer
RINGING_TRANSFER_FAILS = "38ab47e1-6a70-4881-b9da-01125882e727"  # ringing; its bridge fails

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
    return messages


def _head(message: bytes) -> bytes:
    return message.split(b"\n\n", 1)[0]


def _body(message: bytes) -> bytes:
    return message.split(b"\n\n", 1)[1]


def event_fields(message: bytes) -> dict[str, Any] | None:
    """A JSON event's fields, or None for any other message."""
    if b"Content-Type: text/event-json" not in _head(message):
        return None
    fields: dict[str, Any] = json.loads(_body(message))
    return fields


_EVENT_NAME = re.compile(rb'^(?:\{"Event-Name":"|Event-Name: )([A-Z_]+)')


def event_name(message: bytes) -> str | None:
    """``Event-Name`` of a JSON or plain event (whole or cut short), None for a reply."""
    head = _head(message)
    if b"text/event-json" not in head and b"text/event-plain" not in head:
        return None
    match = _EVENT_NAME.match(_body(message))
    return match.group(1).decode() if match else ""


def replace_in_event(message: bytes, old: bytes, new: bytes) -> bytes:
    """A captured event with bytes of its body changed (its Content-Length recomputed)."""
    head, body = message.split(b"\n\n", 1)
    assert old in body
    body = body.replace(old, new)
    return _LENGTH.sub(f"Content-Length: {len(body)}".encode(), head) + b"\n\n" + body


@dataclass
class Channel:
    """A captured call: its events, by what brings them."""

    park: bytes | None  # None: parked while nobody listened (UNSEEN)
    answered_by_dialplan: bool
    dtmf: list[bytes] = field(default_factory=list)
    bridged: bytes | None = None  # a transfer's bridge
    reparked: bytes | None = None  # a transfer's failure
    caller_hangup: bytes | None = None  # the caller's BYE or CANCEL
    freeswitch_hangup: bytes | None = None  # uuid_kill, sendmsg hangup, fsctl shutdown
    dump: bytes | None = None  # api uuid_dump json


class Captured:
    """The captured messages the peer draws on."""

    def __init__(self) -> None:
        session = split_capture((CAPTURES / "s1_inbound_plain_all.rx.bin").read_bytes())
        refused = split_capture((CAPTURES / "s1_inbound_bad_password.rx.bin").read_bytes())
        self.greeting = session[0]
        self.accepted = session[1]
        self.subscribed_plain = session[2]
        self.status = session[3]
        self.refused = refused[1:]  # -ERR invalid, then the disconnect notice
        self.ok_command = next(m for m in session if m.endswith(b"Reply-Text: +OK\n\n"))
        self.bye = next(m for m in session if m.endswith(b"Reply-Text: +OK bye\n\n"))
        self.disconnect = session[-1]
        self.streams = {
            path.relative_to(LIVE).as_posix(): split_capture(path.read_bytes())
            for path in sorted(LIVE.glob("*/conn-*.s2c.bin"))
        }
        call = self.streams["call/conn-1.s2c.bin"]
        self.subscribed_json = call[2]
        self.ok_setvar = call[3]  # global_setvar answers "+OK" with no newline
        self.listing_empty = call[4]
        assert _body(self.ok_setvar) == b"+OK" and b'"row_count": 0' in self.listing_empty
        self.dtmf_sent = next(m for m in call if b"sent DTMF" in m)
        transfer = self.streams["transfer-ok/conn-1.s2c.bin"]
        self.ok_api = next(m for m in transfer if b"api/response" in m and _body(m) == b"+OK\n")
        resync = self.streams["link-down-hangup/conn-2.s2c.bin"]
        self.exists_false = next(m for m in resync if _body(m) == b"false")
        outage = self.streams["outage-refusal/conn-2.s2c.bin"]
        self.exists_true = next(m for m in outage if _body(m) == b"true")
        stale = self.streams["outage-refusal/conn-1.s2c.bin"]
        self.no_channel = next(m for m in stale if _body(m) == b"-ERR No such channel!\n")
        unseen = self.streams["unseen-offer/conn-2.s2c.bin"]
        self.listing_unseen = next(m for m in unseen if UNSEEN.encode() in m and b"row_count" in m)
        dump = next(m for m in unseen if b'"CHANNEL_DATA"' in m)
        self.channels = self._channels({UNSEEN: Channel(None, False, dump=dump)})

    def _channels(self, channels: dict[str, Channel]) -> dict[str, Channel]:
        for stream in self.streams.values():
            for message in stream:
                fields = event_fields(message)
                if fields is None:
                    continue
                uniqueid, name = fields.get("Unique-ID", ""), fields["Event-Name"]
                if name == "CHANNEL_PARK" and uniqueid not in channels:
                    answered = fields.get("Answer-State") == "answered"
                    channels[uniqueid] = Channel(message, answered)
                    continue
                channel = channels.get(uniqueid)
                if channel is None:
                    continue  # a transfer's other leg, not a call the peer offers
                if name == "CHANNEL_PARK" and fields.get("variable_sipbridge_transfer_failed"):
                    channel.reparked = message
                elif name == "CHANNEL_BRIDGE":
                    channel.bridged = message
                elif name == "DTMF":
                    channel.dtmf.append(message)
                elif name == "CHANNEL_HANGUP_COMPLETE":
                    disposition = str(fields.get("variable_sip_hangup_disposition", ""))
                    if disposition.startswith("send_"):
                        channel.freeswitch_hangup = message
                    else:
                        channel.caller_hangup = message
        return channels


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
    # The channels FreeSWITCH holds now (parked by the test, until they hang up).
    channels: set[str] = field(default_factory=set)
    # Channels whose own thread answered them (see the module docstring).
    answered_in_thread: set[str] = field(default_factory=set)
    # The captured call parked while sipbridge was away: listed by show channels.
    parked_unseen: bool = False
    # FreeSWITCH aborted (a unicast on a channel not answered in its own thread).
    crashed: bool = False
    on_command: Callable[[str], None] | None = None
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _subscriptions: dict[asyncio.StreamWriter, set[str]] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        """Aborts every connection (FreeSWITCH restarted, or the network between)."""
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
        name = event_name(message)
        if name is None:
            return True
        subscribed = self._subscriptions.get(writer, set())
        return "ALL" in subscribed or name in subscribed

    # ---- the caller's side ----------------------------------------------------------------------

    def hold(self, uniqueid: str) -> Channel:
        """FreeSWITCH holds the captured call (parked), without telling anyone."""
        channel = self.captured.channels[uniqueid]
        self.channels.add(uniqueid)
        if channel.answered_by_dialplan:
            self.answered_in_thread.add(uniqueid)
        return channel

    def park(self, uniqueid: str) -> None:
        """sipbridge's dialplan parks a captured call: its CHANNEL_PARK, as captured."""
        park = self.hold(uniqueid).park
        assert park is not None, f"{uniqueid} was parked unseen: hold() it"
        self.send(park)

    def offer(self, park: bytes) -> str:
        """Sends any captured CHANNEL_PARK as it is and adopts its channel; returns its uuid."""
        uniqueid = re.search(rb"Unique-ID(?:\": \"|\":\"|: )([0-9a-f-]{36})", park)
        assert event_name(park) == "CHANNEL_PARK" and uniqueid is not None
        channel = uniqueid.group(1).decode()
        self.channels.add(channel)
        if b"Answer-State: answered" in park or b'"Answer-State":"answered"' in park:
            self.answered_in_thread.add(channel)
        self.send(park)
        return channel

    def press(self, uniqueid: str) -> None:
        """The caller presses the captured keys (its DTMF events)."""
        self.send(*self.captured.channels[uniqueid].dtmf)

    def hang_up(self, uniqueid: str) -> None:
        """The caller hangs up: the call's captured hangup by the caller."""
        message = self.captured.channels[uniqueid].caller_hangup
        assert message is not None, f"no captured caller hangup for {uniqueid}"
        self.channels.discard(uniqueid)
        self.send(message)

    def shut_down(self, uniqueid: str) -> None:
        """FreeSWITCH ends the call itself (``fsctl shutdown`` for SHUTDOWN)."""
        self.send(*self._ended_by_freeswitch(uniqueid))

    def _ended_by_freeswitch(self, uniqueid: str) -> list[bytes]:
        if uniqueid not in self.channels:
            return []
        self.channels.discard(uniqueid)
        channel = self.captured.channels.get(uniqueid)
        message = channel.freeswitch_hangup if channel is not None else None
        return [message] if message is not None else []

    @property
    def requests(self) -> list[str]:
        """The commands received, less the watchdog's heartbeats (they come at any time)."""
        return [c for c in self.commands if "global_setvar sipbridge_heartbeat" not in c]

    async def wait_command(self, prefix: str, timeout: float = 10.0, count: int = 1) -> str:
        """The ``count``-th command received that starts with ``prefix`` (waiting for it)."""

        async def wait() -> str:
            while True:
                found = [command for command in self.commands if command.startswith(prefix)]
                if len(found) >= count:
                    return found[count - 1]
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(wait(), timeout)

    async def wait_connections(self, count: int, timeout: float = 10.0) -> None:
        async def wait() -> None:
            while self.connections < count:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    # ---- the Event Socket -----------------------------------------------------------------------

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
            json_mode = len(words) > 1 and words[1] == "json"
            writer.write(captured.subscribed_json if json_mode else captured.subscribed_plain)
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
            return captured.ok_setvar, []
        if name == "show" and words[1:] == ["channels", "as", "json"]:
            unseen = self.parked_unseen and UNSEEN in self.channels
            return (captured.listing_unseen if unseen else captured.listing_empty), []
        uniqueid = words[1] if len(words) > 1 else ""
        if name == "uuid_exists":
            return (
                captured.exists_true if uniqueid in self.channels else captured.exists_false
            ), []
        if uniqueid not in self.channels:
            return captured.no_channel, []
        channel = captured.channels.get(uniqueid) or Channel(None, False)
        if name == "uuid_dump" and channel.dump is not None:
            return channel.dump, []
        if name == "uuid_kill":
            return captured.ok_api, self._ended_by_freeswitch(uniqueid)
        if name == "uuid_send_dtmf":
            reply = captured.dtmf_sent.replace(CALL.encode(), uniqueid.encode())
            return replace_in_event(reply, b"DTMF 7.", f"DTMF {words[2]}.".encode()), []
        if name == "uuid_transfer":
            outcome = channel.bridged or channel.reparked
            return captured.ok_api, [outcome] if outcome is not None else []
        # uuid_setvar; uuid_answer (from the api thread: the channel stays out of
        # answered_in_thread).
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
        elif call_command == "hangup":
            self.send(*self._ended_by_freeswitch(uniqueid))
        return True
