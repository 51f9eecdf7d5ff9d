"""What a caller hears: RTP captured on the loopback interface (root, AF_PACKET).

SIPp receives Asterisk's RTP but keeps nothing of it, so the lab and the tests watch the
packets on ``lo`` instead, through a packet socket (Linux ``packet(7)``; root or CAP_NET_RAW, no
tcpdump): UDP to the caller's media port, PCMU payloads decoded to 8 kHz PCM in sequence-number
order.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bridge.audio import ulaw_to_pcm

ETH_P_ALL = 0x0003
# RFC 4733 section 3.2: events 0-9, *, #, A-D.
_EVENT_KEYS = dict(enumerate("0123456789*#ABCD"))
PACKET_OUTGOING = 4  # each loopback packet is seen leaving and arriving; keep one copy
_ETH_HEADER = 14


@dataclass
class RtpPacket:
    """One RTP packet as captured."""

    arrival: float
    sequence: int
    timestamp: int
    payload_type: int
    payload: bytes


@dataclass
class RtpCapture:
    """Collects RTP sent to UDP ``port`` on 127.0.0.1 while running."""

    port: int
    packets: list[RtpPacket] = field(default_factory=list)
    _sock: socket.socket | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_until(self, predicate: Callable[[RtpCapture], bool]) -> None:
        """Returns once ``predicate`` holds, checking it as packets arrive."""
        while not predicate(self):
            self._arrived.clear()
            await self._arrived.wait()

    def start(self) -> None:
        """Starts capturing (needs CAP_NET_RAW, i.e. root)."""
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind(("lo", 0))
        sock.setblocking(False)
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._read)

    def stop(self) -> None:
        """Stops capturing."""
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _read(self) -> None:
        assert self._sock is not None
        while True:
            try:
                frame, address = self._sock.recvfrom(65535)
            except BlockingIOError:
                return
            if address[2] == PACKET_OUTGOING:
                continue
            packet = _rtp_to_port(frame, self.port)
            if packet is not None:
                self.add(packet)

    def add(self, packet: RtpPacket) -> None:
        """Records one packet (as the socket reader does) and wakes ``wait_until``."""
        self.packets.append(packet)
        self._arrived.set()

    def telephone_events(self, payload_type: int = 101) -> str:
        """The DTMF keys sent as RFC 4733 events, in order (one per event, however many
        packets repeat it)."""
        keys = []
        last_timestamp: int | None = None
        for packet in sorted(
            (p for p in self.packets if p.payload_type == payload_type and len(p.payload) >= 4),
            key=lambda p: p.sequence,
        ):
            if packet.timestamp != last_timestamp:
                last_timestamp = packet.timestamp
                keys.append(_EVENT_KEYS.get(packet.payload[0], "?"))
        return "".join(keys)

    def pcm(self, payload_type: int = 0) -> bytes:
        """The received PCMU audio as 8 kHz PCM, in sequence order."""
        ordered = sorted(
            (p for p in self.packets if p.payload_type == payload_type),
            key=lambda p: p.sequence,
        )
        return b"".join(ulaw_to_pcm(p.payload) for p in ordered)


def _rtp_to_port(frame: bytes, port: int) -> RtpPacket | None:
    if len(frame) < _ETH_HEADER + 20 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[_ETH_HEADER:]
    header_len = (ip[0] & 0x0F) * 4
    if ip[9] != socket.IPPROTO_UDP or len(ip) < header_len + 8:
        return None
    udp = ip[header_len:]
    _, destination, length, _ = struct.unpack("!HHHH", udp[:8])
    if destination != port:
        return None
    rtp = udp[8:length]
    if len(rtp) < 12 or rtp[0] >> 6 != 2:
        return None
    csrc = rtp[0] & 0x0F
    offset = 12 + 4 * csrc
    if rtp[0] & 0x10 and len(rtp) >= offset + 4:
        offset += 4 + 4 * struct.unpack("!H", rtp[offset + 2 : offset + 4])[0]
    sequence, timestamp = struct.unpack("!HI", rtp[2:8])
    return RtpPacket(time.monotonic(), sequence, timestamp, rtp[1] & 0x7F, bytes(rtp[offset:]))
