"""The unicast datagram checks: only FreeSWITCH's own stream reaches the call."""

from __future__ import annotations

from bridge.protocol.unicast import MAX_DATAGRAM_BYTES, Audio, Refused, UnicastDecoder

FRAME = b"\x01\x02" * 160
# A frame FreeSWITCH sends where no RTP came (seen in the captures' run): all 0xFF, i.e. -1.
NO_RTP = b"\xff" * 320


def test_audio_from_freeswitchs_unicast_port_is_the_calls() -> None:
    decoder = UnicastDecoder("127.0.0.1", 12000)
    assert not decoder.started  # no source yet: nowhere to send the caller's audio
    assert decoder.datagram_received(FRAME, ("127.0.0.1", 12000)) == Audio(FRAME)
    assert decoder.source == ("127.0.0.1", 12000)
    assert decoder.datagram_received(NO_RTP, ("127.0.0.1", 12000)) == Audio(NO_RTP)


def test_strangers_odd_and_oversized_datagrams_are_refused() -> None:
    decoder = UnicastDecoder("127.0.0.1", 12000)
    for source in (("127.0.0.2", 12000), ("127.0.0.1", 12001)):  # another host, another port
        refused = decoder.datagram_received(FRAME, source)
        assert isinstance(refused, Refused) and "not FreeSWITCH's 127.0.0.1:12000" in refused.reason
    for data in (b"", b"\x01\x02\x03", b"\x00" * (MAX_DATAGRAM_BYTES + 2)):
        assert isinstance(decoder.datagram_received(data, ("127.0.0.1", 12000)), Refused)
    assert decoder.source is None and decoder.refused == 5
    assert isinstance(decoder.datagram_received(b"\x00\x00", ("127.0.0.1", 12000)), Audio)
