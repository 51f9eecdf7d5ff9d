"""The AMI link against a loopback AMI peer replaying Asterisk 22's captured messages: each
panoramisk defect it works around has a regression test (the backend's own tests cover the rest:
a refused login, reconnects, actions failing when the link drops)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.pbx.asterisk.link import AmiLink
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
