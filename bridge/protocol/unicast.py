"""FreeSWITCH's unicast audio (``call-command: unicast``), sans I/O.

FreeSWITCH sends each 20 ms frame it reads from the caller as one UDP datagram of 16-bit linear
PCM at 8 kHz (320 bytes; in the captures' run, 693 such frames for 13.9 s, and frames of all
``0xFF`` where no RTP came: -1, silence) and plays what it receives on the same socket pair.
Nothing else frames the audio, so this object guards the one thing a datagram socket cannot:
who sent it. The first datagram from FreeSWITCH's address pins its port; a datagram from any
other source, of an odd length or over the size limit is refused (a stray or spoofed packet
never reaches the caller's conversation), and each refusal says why.
"""

from __future__ import annotations

from dataclasses import dataclass

FRAME_BYTES = 320  # 20 ms of 8 kHz slin
MAX_DATAGRAM_BYTES = 4 * FRAME_BYTES


@dataclass(frozen=True)
class Audio:
    """Caller audio: 16-bit PCM at 8 kHz."""

    pcm: bytes


@dataclass(frozen=True)
class Refused:
    """A datagram that is not the call's audio, and why."""

    reason: str


class UnicastDecoder:
    """Checks the datagrams of one call's unicast stream.

    Args:
        expected_host: FreeSWITCH's unicast address (``freeswitch.unicast_host``).
        max_datagram_bytes: the largest datagram accepted.
    """

    def __init__(self, expected_host: str, max_datagram_bytes: int = MAX_DATAGRAM_BYTES) -> None:
        self.expected_host = expected_host
        self.max_datagram_bytes = max_datagram_bytes
        self.source: tuple[str, int] | None = None
        self.refused = 0

    def datagram_received(self, data: bytes, source: tuple[str, int]) -> Audio | Refused:
        """What one datagram is."""
        verdict = self._check(data, source)
        if isinstance(verdict, Refused):
            self.refused += 1
        return verdict

    def _check(self, data: bytes, source: tuple[str, int]) -> Audio | Refused:
        host, port = source[0], source[1]
        if self.source is None:
            if host != self.expected_host:
                return Refused(f"datagram from {host}, not FreeSWITCH's {self.expected_host}")
        elif (host, port) != self.source:
            return Refused(
                f"datagram from {host}:{port}, not the call's {self.source[0]}:{self.source[1]}"
            )
        if not data or len(data) % 2:
            return Refused(f"datagram of {len(data)} bytes is not 16-bit PCM")
        if len(data) > self.max_datagram_bytes:
            return Refused(f"datagram of {len(data)} bytes is over {self.max_datagram_bytes}")
        if self.source is None:
            self.source = (host, port)
        return Audio(data)
