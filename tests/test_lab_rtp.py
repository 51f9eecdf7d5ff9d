from __future__ import annotations

import asyncio
import struct

from bridge.audio import pcm_to_ulaw, sine, tone_share
from bridge.lab.rtp import RtpCapture, RtpPacket, _rtp_to_port


def frame(port: int, sequence: int, payload: bytes, payload_type: int = 0, csrc: int = 0) -> bytes:
    rtp = (
        struct.pack("!BBHII", 0x80 | csrc, payload_type, sequence, sequence * 160, 0x1234)
        + b"\x00" * (4 * csrc)
        + payload
    )
    udp = struct.pack("!HHHH", 40000, port, 8 + len(rtp), 0) + rtp
    ip = (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(udp),
            0,
            0,
            64,
            17,
            0,
            b"\x7f\x00\x00\x01",
            b"\x7f\x00\x00\x01",
        )
        + udp
    )
    return b"\x00" * 12 + b"\x08\x00" + ip  # loopback's zeroed Ethernet header


def test_rtp_to_our_port_is_parsed() -> None:
    packet = _rtp_to_port(frame(5000, 7, b"\xff" * 160, csrc=1), 5000)
    assert packet is not None
    assert (packet.sequence, packet.timestamp, packet.payload_type, packet.payload) == (
        7,
        1120,
        0,
        b"\xff" * 160,
    )
    assert _rtp_to_port(frame(5002, 7, b"x"), 5000) is None  # another port
    assert _rtp_to_port(b"\x00" * 12 + b"\x86\xdd" + b"\x00" * 60, 5000) is None  # IPv6
    assert _rtp_to_port(frame(5000, 1, b"")[:30], 5000) is None  # truncated


def test_capture_orders_by_sequence_and_decodes() -> None:
    tone = pcm_to_ulaw(sine(700, 0.2))
    chunks = [tone[i : i + 160] for i in range(0, len(tone), 160)]
    capture = RtpCapture(5000)
    for sequence in (2, 0, 1, 4, 3, 5, 6, 7, 8, 9):
        capture.packets.append(RtpPacket(0.0, sequence, sequence * 160, 0, chunks[sequence]))
    capture.packets.append(
        RtpPacket(0.0, 10, 0, 101, b"\x01\x02\x03\x04")
    )  # telephone-event, not audio
    pcm = capture.pcm()
    assert len(pcm) == 3200
    assert tone_share(pcm, 8000, 700) > 0.99


async def test_waiting_until_enough_packets_arrived() -> None:
    capture = RtpCapture(5000)
    waiter = asyncio.ensure_future(capture.wait_until(lambda c: len(c.packets) >= 2))
    for sequence in range(2):
        await asyncio.sleep(0)
        assert not waiter.done()
        capture.add(RtpPacket(0.0, sequence, 0, 0, b"\xff" * 160))
    await asyncio.wait_for(waiter, 1)


def test_telephone_events_are_read_once_per_key() -> None:
    capture = RtpCapture(5000)
    sequence = 0
    for timestamp, key, repeats in ((800, 7, 4), (4000, 11, 3)):  # "7", then "#"
        for _ in range(repeats):  # each event repeats, the last packets with the E bit
            capture.add(RtpPacket(0.0, sequence, timestamp, 101, bytes([key, 0x0A, 0, 160])))
            sequence += 1
    capture.add(RtpPacket(0.0, sequence, 9000, 0, b"\xff" * 160))  # audio is not an event
    assert capture.telephone_events() == "7#"
