"""FreeSWITCH's unicast audio: one UDP socket per accepted call.

The backend tells FreeSWITCH (``call-command: unicast``) to send the call's audio to the socket
:meth:`UnicastMedia.open` bound; the first datagram from FreeSWITCH hands the leg to the call
(as the UUID frame does for AudioSocket), and audio toward the caller goes back to where
FreeSWITCH sends from. FreeSWITCH neither paces nor fills what it is sent, like Asterisk: the
session's paced writer does. DTMF does not travel in unicast audio: the backend reports DTMF
events and :meth:`UnicastMedia.dtmf` puts them in the call's leg. A datagram from anyone but
FreeSWITCH is refused (:mod:`bridge.protocol.unicast`). Unicast has no hangup of its own:
closing a leg frees its socket and nothing else (the backend hangs channels up over ESL).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

from bridge.events import LegAudio, LegClosed, LegDtmf, LegEvent, LegSink
from bridge.legs import LegOutlet
from bridge.protocol import unicast as wire

log = logging.getLogger(__name__)

# FreeSWITCH sends a datagram every 20 ms while unicast runs (silence included): after this long
# without one, it is not listening either (the channel ended, or a transfer took it out of park).
FREESWITCH_SILENT_S = 1.0
_LOGGED_REFUSALS = 5


class UnicastLeg(asyncio.DatagramProtocol):
    """One call's unicast socket, as a ``MediaLeg``."""

    rate = 8000

    def __init__(
        self,
        call_id: str,
        decoder: wire.UnicastDecoder,
        on_first_audio: Callable[[UnicastLeg], None],
        on_close: Callable[[UnicastLeg], None],
    ) -> None:
        self.call_id = call_id
        self._decoder = decoder
        self._on_first_audio = on_first_audio
        self._on_close = on_close
        # The session takes the events as they arrive; until it does, 5 s of them are kept.
        self._outlet = LegOutlet()
        self._transport: asyncio.DatagramTransport | None = None
        self.started = False
        self.closed = False
        # When FreeSWITCH's last datagram came (loop clock, and wall clock for call records).
        self.last_audio_monotonic = 0.0
        self.last_audio_wall = 0.0

    # ---- asyncio.DatagramProtocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport is not a DatagramTransport subclass (3.11).
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        verdict = self._decoder.datagram_received(data, (str(addr[0]), int(addr[1])))
        if isinstance(verdict, wire.Refused):
            if self._decoder.refused <= _LOGGED_REFUSALS:
                log.warning("call %s: refused a unicast datagram: %s", self.call_id, verdict.reason)
            return
        if self.closed:
            return
        self.last_audio_monotonic = time.monotonic()
        self.last_audio_wall = time.time()
        if not self.started:
            self.started = True
            self._on_first_audio(self)
        self._put(LegAudio(verdict.pcm))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: FreeSWITCH's side went away; its hangup follows.
        log.debug("call %s: unicast socket error: %s", self.call_id, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self._put(LegClosed(by_caller=False, detail=f"unicast socket closed: {exc}"))

    def _put(self, event: LegEvent) -> None:
        self._outlet.put(event)

    @property
    def dropped_frames(self) -> int:
        """Caller audio that gave way while no session took it."""
        return self._outlet.dropped

    # ---- MediaLeg ------------------------------------------------------------------------------

    def deliver(self, sink: LegSink | None) -> None:
        """Events go to ``sink`` as they arrive (see :class:`bridge.legs.LegOutlet`)."""
        self._outlet.attach(sink)

    async def receive(self) -> list[LegEvent]:
        """The next events; the last one is a :class:`LegClosed`."""
        return await self._outlet.receive()

    def send_audio(self, pcm: bytes) -> bool:
        """Sends one frame to FreeSWITCH (dropped until its first datagram says from where)."""
        source = self._decoder.source
        if self.closed or source is None or self._transport is None:
            return False
        if time.monotonic() - self.last_audio_monotonic > FREESWITCH_SILENT_S:
            return False  # nobody is listening: no audio toward a dead channel
        self._transport.sendto(pcm, source)
        return True

    async def aclose(self) -> None:
        """The conversation is done with the leg: the socket is freed."""
        self.close(by_caller=False, detail="conversation over")

    # ---- from the backend ----------------------------------------------------------------------

    def dtmf(self, digit: str) -> None:
        """The caller pressed a key (a FreeSWITCH DTMF event)."""
        if not self.closed:
            self._put(LegDtmf(digit))

    def close(self, *, by_caller: bool, detail: str = "") -> None:
        """Ends the leg: the session sees :class:`LegClosed`; the socket is freed."""
        if not self.closed:
            self.closed = True
            self._put(LegClosed(by_caller=by_caller, detail=detail))
        if self._transport is not None:
            self._transport.close()
        self._on_close(self)


# Hands a leg that got its first audio to its owner (the backend posts LegConnected).
LegHandler = Callable[[str, UnicastLeg], None]


class UnicastMedia:
    """The unicast sockets of the FreeSWITCH calls, by FreeSWITCH channel uuid.

    Args:
        host: the address sipbridge's sockets bind.
        advertise: the address FreeSWITCH is told to send to (default: ``host``).
        on_leg: takes a call's leg once its first audio arrived.
        start_timeout_s: a socket that gets no audio within this is closed.
    """

    def __init__(
        self,
        host: str,
        advertise: str | None,
        *,
        on_leg: LegHandler,
        start_timeout_s: float,
    ) -> None:
        self.host = host
        self.advertise = advertise or host
        self._on_leg = on_leg
        self._start_timeout_s = start_timeout_s
        self._legs: dict[str, UnicastLeg] = {}

    def __len__(self) -> int:
        return len(self._legs)

    async def open(
        self, call_id: str, channel: str, freeswitch: tuple[str, int]
    ) -> tuple[str, int]:
        """Binds the call's socket for audio from ``freeswitch`` (its unicast host and port);
        returns where FreeSWITCH should send (host, port)."""
        old = self._legs.pop(channel, None)
        if old is not None:
            old.close(by_caller=False, detail="replaced")
        loop = asyncio.get_running_loop()
        transport, leg = await loop.create_datagram_endpoint(
            lambda: UnicastLeg(
                call_id,
                wire.UnicastDecoder(freeswitch[0], freeswitch[1]),
                lambda started: self._on_leg(started.call_id, started),
                lambda closed: self._closed(channel, closed),
            ),
            local_addr=(self.host, 0),
        )
        self._legs[channel] = leg
        loop.call_later(self._start_timeout_s, self._check_started, channel, leg)
        port = transport.get_extra_info("sockname")[1]
        log.info("call %s: unicast socket %s:%d for FreeSWITCH", call_id, self.host, port)
        return self.advertise, int(port)

    def _closed(self, channel: str, leg: UnicastLeg) -> None:
        if self._legs.get(channel) is leg:
            del self._legs[channel]

    def _check_started(self, channel: str, leg: UnicastLeg) -> None:
        if not leg.started and self._legs.get(channel) is leg:
            log.warning(
                "call %s: no unicast audio from FreeSWITCH within %.0f s",
                leg.call_id,
                self._start_timeout_s,
            )
            leg.close(by_caller=False, detail="no audio from FreeSWITCH")

    def dtmf(self, channel: str, digit: str) -> None:
        """A DTMF event for the channel's leg."""
        leg = self._legs.get(channel)
        if leg is not None:
            leg.dtmf(digit)

    def last_audio_at(self, channel: str) -> datetime | None:
        """When FreeSWITCH last sent the channel's audio: a call that ended while the event
        socket was down ended about then."""
        leg = self._legs.get(channel)
        if leg is None or not leg.last_audio_wall:
            return None
        return datetime.fromtimestamp(leg.last_audio_wall, UTC)

    def hung_up(self, channel: str) -> None:
        """FreeSWITCH reports the channel gone: its leg ends as the caller's hangup."""
        leg = self._legs.get(channel)
        if leg is not None:
            leg.close(by_caller=True)

    async def aclose(self) -> None:
        """Closes every socket (their conversations see the leg closed)."""
        for leg in list(self._legs.values()):
            leg.close(by_caller=False, detail="sipbridge is stopping")
        self._legs.clear()
