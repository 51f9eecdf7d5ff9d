"""FreeSWITCH's unicast audio (``call-command: unicast``), sans I/O.

FreeSWITCH sends each 20 ms frame it reads from the caller as one UDP datagram of 16-bit linear
PCM at 8 kHz (320 bytes; in the captures' run, 693 such frames for 13.9 s, and frames of all
``0xFF`` where no RTP came: -1, silence) and plays what it receives on the same socket pair.
Nothing else frames the audio, so this object guards the one thing a datagram socket cannot:
who sent it. FreeSWITCH sends from the address and port it was told to bind (``local-ip`` and
``local-port`` of the unicast command); a datagram from any other source, of an odd length or
over the size limit is refused (a stray or spoofed packet never reaches the caller's
conversation), and each refusal says why.
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
        expected_port: the port FreeSWITCH binds for this call (``local-port``).
        max_datagram_bytes: the largest datagram accepted.
    """

    def __init__(
        self,
        expected_host: str,
        expected_port: int,
        max_datagram_bytes: int = MAX_DATAGRAM_BYTES,
    ) -> None:
        self.expected = (expected_host, expected_port)
        self.max_datagram_bytes = max_datagram_bytes
        self.started = False
        self.refused = 0

    @property
    def source(self) -> tuple[str, int] | None:
        """Where FreeSWITCH sends from, once it has: where audio for the caller goes."""
        return self.expected if self.started else None

    def datagram_received(self, data: bytes, source: tuple[str, int]) -> Audio | Refused:
        """What one datagram is."""
        verdict = self._check(data, source)
        if isinstance(verdict, Refused):
            self.refused += 1
        else:
            self.started = True
        return verdict

    def _check(self, data: bytes, source: tuple[str, int]) -> Audio | Refused:
        if (source[0], source[1]) != self.expected:
            return Refused(
                f"datagram from {source[0]}:{source[1]}, not FreeSWITCH's "
                f"{self.expected[0]}:{self.expected[1]}"
            )
        if not data or len(data) % 2:
            return Refused(f"datagram of {len(data)} bytes is not 16-bit PCM")
        if len(data) > self.max_datagram_bytes:
            return Refused(f"datagram of {len(data)} bytes is over {self.max_datagram_bytes}")
        return Audio(data)
