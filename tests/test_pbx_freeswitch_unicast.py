"""Unicast legs over real loopback UDP sockets."""

from __future__ import annotations

import asyncio
from typing import cast

from bridge.audio import sine, tone_share
from bridge.events import LegAudio, LegClosed, LegDtmf, LegEvent
from bridge.pbx.freeswitch.unicast import UnicastLeg, UnicastMedia


class Peer(asyncio.DatagramProtocol):
    """A UDP socket standing in for FreeSWITCH's side (or a stranger)."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait(data)


async def open_peer(host: str = "127.0.0.1") -> Peer:
    _, peer = await asyncio.get_running_loop().create_datagram_endpoint(Peer, local_addr=(host, 0))
    return peer


async def events_until(leg: UnicastLeg, count: int) -> list[LegEvent]:
    events: list[LegEvent] = []
    while len(events) < count:
        events += await asyncio.wait_for(leg.receive(), 5)
    return events


async def test_first_audio_starts_the_conversation_and_audio_goes_back() -> None:
    started: asyncio.Queue[UnicastLeg] = asyncio.Queue()

    def on_leg(call_id: str, leg: UnicastLeg) -> None:
        assert call_id == "call-1"
        started.put_nowait(leg)

    media = UnicastMedia("127.0.0.1", None, on_leg=on_leg, start_timeout_s=5)
    freeswitch = await open_peer()
    assert freeswitch.transport is not None
    address = await media.open("call-1", "chan-1", freeswitch.address)
    assert address[0] == "127.0.0.1" and len(media) == 1
    tone = sine(700, 0.04)
    freeswitch.transport.sendto(tone[:320], address)
    freeswitch.transport.sendto(tone[320:], address)
    leg = await asyncio.wait_for(started.get(), 5)
    assert await events_until(leg, 2) == [LegAudio(tone[:320]), LegAudio(tone[320:])]
    media.dtmf("chan-1", "5")
    assert await events_until(leg, 1) == [LegDtmf("5")]
    reply = sine(1300, 0.02)
    assert leg.send_audio(reply)
    back = await asyncio.wait_for(freeswitch.received.get(), 5)
    assert back == reply and tone_share(back, 8000, 1300) > 0.9
    media.hung_up("chan-1")  # FreeSWITCH's CHANNEL_HANGUP_COMPLETE
    assert (await leg.receive())[-1] == LegClosed(by_caller=True)
    assert not leg.send_audio(reply) and len(media) == 0
    await leg.aclose()  # the owner frees it; a second close changes nothing
    await media.aclose()
    freeswitch.transport.close()


async def test_a_socket_that_hears_nothing_is_closed() -> None:
    def on_leg(call_id: str, leg: UnicastLeg) -> None:
        raise AssertionError("never started")

    media = UnicastMedia("127.0.0.1", "192.0.2.7", on_leg=on_leg, start_timeout_s=0.05)
    address = await media.open("call-1", "chan-1", ("127.0.0.1", 12000))
    assert address[0] == "192.0.2.7"  # what FreeSWITCH is told (media.unicast_advertise)
    leg = media._legs["chan-1"]
    closed = await asyncio.wait_for(leg.receive(), 5)
    assert closed == [LegClosed(by_caller=False, detail="no audio from FreeSWITCH")]
    assert len(media) == 0
    await media.aclose()


async def test_audio_from_a_stranger_never_reaches_the_call() -> None:
    started: asyncio.Queue[UnicastLeg] = asyncio.Queue()

    media = UnicastMedia(
        "127.0.0.1", None, on_leg=lambda _, leg: started.put_nowait(leg), start_timeout_s=5
    )
    freeswitch = await open_peer()
    # Another host, and FreeSWITCH's own host from another port.
    strangers = [await open_peer("127.0.0.2"), await open_peer()]
    address = await media.open("call-1", "chan-1", freeswitch.address)
    for stranger in strangers:
        assert stranger.transport is not None
        stranger.transport.sendto(b"\x11" * 320, address)  # first, from the wrong source
    assert freeswitch.transport is not None
    freeswitch.transport.sendto(b"\x22" * 320, address)
    leg = await asyncio.wait_for(started.get(), 5)
    assert await leg.receive() == [LegAudio(b"\x22" * 320)]
    assert leg._decoder.refused == 2
    # Audio toward the caller goes to FreeSWITCH's port only.
    assert leg.send_audio(b"\x33" * 320)
    assert await asyncio.wait_for(freeswitch.received.get(), 5) == b"\x33" * 320
    await media.aclose()
    for peer in (freeswitch, *strangers):
        assert peer.transport is not None
        peer.transport.close()


async def test_closing_a_leg_frees_its_socket_and_nothing_else() -> None:
    """Unicast has no hangup of its own: the owner's close frees the socket; the channel is
    ended (or not, after a transfer) by the backend over the Event Socket."""
    media = UnicastMedia("127.0.0.1", None, on_leg=lambda _, leg: None, start_timeout_s=5)
    await media.open("call-1", "chan-1", ("127.0.0.1", 12000))
    leg = media._legs["chan-1"]
    await leg.aclose()
    assert len(media) == 0 and leg.closed
    await media.aclose()
