"""The capture-built Event Socket peer against the captures it is built from.

Its model of the abort FreeSWITCH 1.10.12 suffered live (``faults/02-minimal-repro``) is checked
by replaying those sessions' commands: the peer must send back exactly the bytes FreeSWITCH sent,
and stop where FreeSWITCH stopped.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from tests.esl_peer import FAULTS, EslPeer

REPRO = FAULTS / "02-minimal-repro"


@pytest.fixture
async def peer() -> AsyncIterator[EslPeer]:
    running = EslPeer(password="verify-esl-pw-7f3a")
    await running.start()
    yield running
    await running.stop()


async def replay(
    peer: EslPeer, name: str
) -> tuple[bytes, bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    """Plays a captured client against the peer, FreeSWITCH's events sent by the peer where the
    capture has them: (what FreeSWITCH sent, what the peer sent, the open connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", peer.port)
    captured = received = b""
    for line in (REPRO / f"{name}.jsonl").read_text().splitlines():
        record = json.loads(line)
        data = record["data"].encode("latin-1")
        if record["dir"] == "client->fs":
            writer.write(data)
            continue
        captured += data
        if b"\nEvent-Name: CHANNEL_PARK\n" in data:
            peer.offer(data)
        while len(received) < len(captured):
            more = await asyncio.wait_for(reader.read(65536), 5)
            if not more:
                break
            received += more
    return captured, received, reader, writer


@pytest.mark.parametrize("run", ["ua-gap0-t1", "ua-gap0-t2", "ua-gap0-t3"])
async def test_unicast_after_uuid_answer_aborts_freeswitch_as_it_did_live(
    peer: EslPeer, run: str
) -> None:
    captured, received, reader, writer = await replay(peer, run)
    assert received == captured  # the unicast's +OK was the last thing FreeSWITCH sent
    assert captured.endswith(b"Content-Type: command/reply\nReply-Text: +OK\n\n")
    assert await asyncio.wait_for(reader.read(), 5) == b""  # then it was gone
    assert peer.crashed and not peer.channels
    writer.close()
    # Nothing answers any more.
    reader, writer = await asyncio.open_connection("127.0.0.1", peer.port)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


@pytest.mark.parametrize("run", ["ex-gap0-t1", "ex-gap0-t2"])
async def test_answer_run_in_the_channel_then_unicast_keeps_freeswitch_up(
    peer: EslPeer, run: str
) -> None:
    captured, received, reader, writer = await replay(peer, run)
    assert received == captured  # answer, unicast and the uuid_kill all answered +OK
    assert not peer.crashed
    writer.write(b"exit\n\n")
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(
        b"Content-Type: command/reply\nReply-Text: +OK bye\n\n"
    )
    writer.close()
