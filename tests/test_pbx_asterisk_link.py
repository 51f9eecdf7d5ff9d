"""The AMI link against a loopback AMI peer replaying Asterisk 22's captured messages: each
panoramisk defect it works around has a regression test (the backend's own tests cover the rest:
a refused login, reconnects, actions failing when the link drops)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.pbx.asterisk.link import AmiLink
from bridge.protocol import ami
from tests.ami_peer import HANGUP_EVENT, AmiPeer, render
from tests.test_pbx_asterisk_backend import settings


@pytest.fixture
async def peer() -> AsyncIterator[AmiPeer]:
    server = AmiPeer()
    await server.start()
    yield server
    await server.stop()


async def test_utf8_split_across_reads_survives(peer: AmiPeer) -> None:
    """panoramisk decodes each chunk with errors='ignore': 'José' became 'Jos'."""
    received: list[Any] = []
    arrived = asyncio.Event()

    def on_event(event: Any) -> None:
        received.append(event)
        arrived.set()

    link = AmiLink(settings(peer), on_event)
    await link.open()
    data = render(HANGUP_EVENT, CallerIDName="José Müller")
    split = data.index("é".encode()) + 1  # inside the two bytes of "é"
    await peer.send(data, split_at=split)
    await asyncio.wait_for(arrived.wait(), 5)
    assert received[0]["CallerIDName"] == "José Müller"
    await link.aclose()


async def test_an_answer_read_as_the_limit_runs_out_counts(peer: AmiPeer) -> None:
    """A busy machine holds the event loop past an action's limit while Asterisk's answer
    waits in the socket: the read and the limit's timer come due in the same loop pass, and
    the timer used to win, so a heartbeat answered in time dropped the link."""
    link = AmiLink(settings(peer), lambda _: None)
    await link.open()
    try:
        heard = link.received_bytes
        peer.stall_after = {"setvar": 0.3}  # answers, then holds the loop past the limit
        response = await link.action(ami.heartbeat(1), limit_s=0.2)
        assert response.success
        assert link.received_bytes > heard
    finally:
        await link.aclose()


async def test_wait_up_returns_once_a_session_is_up(peer: AmiPeer) -> None:
    link = AmiLink(settings(peer), lambda _: None)
    waiting = asyncio.ensure_future(link.wait_up())
    await asyncio.sleep(0)
    assert not waiting.done()
    await link.open()
    await asyncio.wait_for(waiting, 5)
    peer.drop_all()
    await asyncio.wait_for(link.wait_lost(), 5)
    assert not link.up
    again = asyncio.ensure_future(link.wait_up())
    await asyncio.sleep(0)
    assert not again.done()
    again.cancel()
    await link.aclose()
