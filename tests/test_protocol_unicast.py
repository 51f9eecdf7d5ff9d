"""The unicast datagram checks: only FreeSWITCH's own stream reaches the call."""

from __future__ import annotations

from bridge.protocol.unicast import MAX_DATAGRAM_BYTES, Audio, Refused, UnicastDecoder

FRAME = b"\x01\x02" * 160
# A frame FreeSWITCH sends where no RTP came (seen in the captures' run): all 0xFF, i.e. -1.
NO_RTP = b"\xff" * 320


def test_the_first_datagram_from_freeswitch_pins_its_port() -> None:
    decoder = UnicastDecoder("127.0.0.1")
    assert decoder.datagram_received(FRAME, ("127.0.0.1", 8025)) == Audio(FRAME)
    assert decoder.source == ("127.0.0.1", 8025)
    assert decoder.datagram_received(NO_RTP, ("127.0.0.1", 8025)) == Audio(NO_RTP)
    other_port = decoder.datagram_received(FRAME, ("127.0.0.1", 8026))
    assert isinstance(other_port, Refused) and "not the call's 127.0.0.1:8025" in other_port.reason
    assert decoder.refused == 1


def test_strangers_odd_and_oversized_datagrams_are_refused() -> None:
    decoder = UnicastDecoder("127.0.0.1")
    stranger = decoder.datagram_received(FRAME, ("127.0.0.2", 8025))
    assert isinstance(stranger, Refused) and "not FreeSWITCH's 127.0.0.1" in stranger.reason
    assert decoder.source is None  # a stranger cannot pin the port
    for data in (b"", b"\x01\x02\x03", b"\x00" * (MAX_DATAGRAM_BYTES + 2)):
        assert isinstance(decoder.datagram_received(data, ("127.0.0.1", 8025)), Refused)
    assert decoder.source is None and decoder.refused == 4
    assert isinstance(decoder.datagram_received(b"\x00\x00", ("127.0.0.1", 8025)), Audio)
