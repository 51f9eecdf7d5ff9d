"""One Event Socket connection: greenswitch's socket read by the sans-I/O decoder, through the
link, against the capture-built peer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bridge.protocol import esl
from tests.esl_link_rig import LinkRig, link_rig
from tests.esl_peer import CALL, replace_in_event


@pytest.fixture
async def rig() -> AsyncIterator[LinkRig]:
    async with link_rig() as running:
        yield running


async def test_a_byte_that_is_not_utf8_neither_drops_the_link_nor_the_event(rig: LinkRig) -> None:
    """greenswitch decodes each line as strict UTF-8: one stray byte from a caller's header
    raised in its reader and dropped the whole link (every call's control with it)."""
    park = rig.peer.captured.channels[CALL].park
    assert park is not None
    hostile = replace_in_event(
        park, b'"variable_sip_h_X-First_Name":"John"', b'"variable_sip_h_X-First_Name":"Jo\xe9n"'
    )
    rig.peer.send(hostile)
    await rig.wait_for(lambda r: r.events)
    assert rig.events[0].headers["variable_sip_h_X-First_Name"] == "Jo\ufffdn"
    assert rig.links == [True]


async def test_a_reply_that_answers_no_command_ends_the_connection(rig: LinkRig) -> None:
    """Replies are matched to commands by order: one that answers nothing means the stream
    is out of step, so the connection is dropped and made again."""
    rig.peer.send(rig.peer.captured.ok_api)
    await rig.wait_for(lambda r: r.links == [True, False, True])
    assert rig.link is not None
    reply = await rig.link.command(esl.command("api status"))
    assert reply.text.startswith("UP ")  # the new connection is in step
