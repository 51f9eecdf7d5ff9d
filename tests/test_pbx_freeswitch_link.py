"""The Event Socket link (its gevent thread, supervisor and asyncio bridge) against the
capture-built peer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from bridge.errors import PbxConnectionError
from bridge.pbx.freeswitch.backend import SUBSCRIPTION
from bridge.protocol import esl
from tests.esl_link_rig import LinkRig, link_rig
from tests.esl_peer import CALL, PASSWORD


@pytest.fixture
async def rig() -> AsyncIterator[LinkRig]:
    async with link_rig() as running:
        yield running


async def test_it_logs_in_subscribes_and_hands_events_and_replies_to_asyncio(
    rig: LinkRig,
) -> None:
    assert rig.peer.commands[:2] == [f"auth {PASSWORD}", SUBSCRIPTION]
    rig.peer.park(CALL)
    reply = await command(rig)
    assert reply.content_type == esl.API_RESPONSE and "UP" in reply.text
    await rig.wait_for(lambda r: r.events)
    assert rig.events[0].name == "CHANNEL_PARK" and rig.events[0].unique_id == CALL


async def test_a_command_in_flight_fails_at_once_when_the_link_drops(rig: LinkRig) -> None:
    peer = rig.peer
    peer.silent = True
    pending = asyncio.ensure_future(command(rig))
    await peer.wait_command("api status")
    peer.cut()
    with pytest.raises(PbxConnectionError):
        await asyncio.wait_for(pending, 2.0)  # far sooner than the 5 s action timeout
    peer.silent = False
    await rig.wait_for(lambda r: r.links == [True, False, True])
    # Nothing is re-sent on the new connection.
    after = peer.commands[peer.commands.index("api status") + 1 :]
    assert "api status" not in after[:2]
    with pytest.raises(PbxConnectionError):
        peer.refuse = True
        peer.cut()
        await rig.wait_for(lambda r: r.links[-1] is False)
        await command(rig)  # down: refused at once


async def test_a_stream_cut_in_the_middle_of_an_event_is_a_lost_link(rig: LinkRig) -> None:
    """greenswitch would spin on the short read (100 % CPU); here the link just drops."""
    peer = rig.peer
    park = peer.captured.channels[CALL].park
    assert park is not None
    peer.send(park[: len(park) // 2])
    peer.cut()
    await rig.wait_for(lambda r: r.links == [True, False, True])
    assert rig.events == []
    peer.park(CALL)  # the new connection works
    await rig.wait_for(lambda r: len(r.events) == 1)


async def command(rig: LinkRig) -> esl.EslMessage:
    assert rig.link is not None
    return await rig.link.command(esl.command("api status"))
