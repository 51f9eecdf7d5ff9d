"""The pipeline websocket client against real servers."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from bridge.errors import PipelineError
from bridge.pipeline import PipelineConnection
from bridge.settings import PipelineSettings, TlsSettings
from bridge.tls import client_context
from tests.pipeline_server import PipelineServer
from tests.webhook_sink import WebhookSink


async def test_messages_both_ways_and_a_normal_close(pipeline: PipelineServer) -> None:
    stream = await PipelineConnection.open(
        pipeline.url, {"Authorization": "Bearer t"}, PipelineSettings()
    )
    await stream.send('{"type": "start", "callId": "c1"}')
    session = await pipeline.session()
    assert session.headers["authorization"] == "Bearer t"
    assert session.headers["user-agent"].startswith("sipbridge/")
    assert stream.send_audio(b"\x01\x02" * 10)
    assert await session.wait_audio(20) == b"\x01\x02" * 10
    # The twilio dialect's audio is text (JSON): it goes as a text frame.
    assert stream.send_audio('{"event": "media", "media": {"payload": "AQI="}}')
    assert await session.wait_audio(22) == b"\x01\x02" * 11  # the server decodes it
    await session.send(b"\x03\x04")
    await session.send_json({"type": "clear"})
    assert await stream.receive() == b"\x03\x04"
    assert await stream.receive() == '{"type": "clear"}'
    open_code = stream.close_code
    assert open_code is None
    await session.ws.close(1000)
    assert await stream.receive() is None
    assert stream.close_code == 1000
    await stream.send("after close")  # not an error: the reader reports the close
    assert not stream.send_audio(b"\x05\x06")  # dropped, never raised or waited for
    assert stream.dropped_audio == 1
    await stream.aclose()


async def test_unreachable_refused_or_not_a_websocket(sink: WebhookSink) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    settings = PipelineSettings(connect_timeout_s=2)
    with pytest.raises(PipelineError, match="cannot open the pipeline websocket"):
        await PipelineConnection.open(f"ws://127.0.0.1:{port}/x", {}, settings)
    http_url = sink.url.replace("http://", "ws://")  # an HTTP server that does not upgrade
    with pytest.raises(PipelineError):
        await PipelineConnection.open(http_url, {}, settings)
    with pytest.raises(PipelineError):
        await PipelineConnection.open("ws://", {}, settings)


async def test_a_silent_server_times_out_the_handshake() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # accepts TCP, never answers the HTTP upgrade
        port = listener.getsockname()[1]
        with pytest.raises(PipelineError):
            await PipelineConnection.open(
                f"ws://127.0.0.1:{port}/x", {}, PipelineSettings(connect_timeout_s=0.3)
            )


async def test_oversized_messages_from_the_pipeline_close_it(pipeline: PipelineServer) -> None:
    stream = await PipelineConnection.open(
        pipeline.url, {}, PipelineSettings(max_message_bytes=1024)
    )
    await stream.send('{"type": "start", "callId": "c1"}')
    session = await pipeline.session()
    await session.send(bytes(4096))
    assert await stream.receive() is None
    assert stream.close_code not in (None, 1000, 1001)  # we failed it (1009), not a clean close


async def test_a_pipeline_that_stops_reading_gets_audio_dropped_never_waited_for(
    pipeline: PipelineServer,
) -> None:
    stream = await PipelineConnection.open(pipeline.url, {}, PipelineSettings())
    await stream.send('{"type": "start", "callId": "c1"}')
    session = await pipeline.session()
    session.ws.transport.pause_reading()  # the pipeline's process hangs
    frame = b"\x01\x02" * 320  # 20 ms at 16 kHz
    sent = 0
    # Once the socket buffers are full, audio is dropped; a send that waited for the pipeline
    # to drain would stall the caller's audio (and time this out).
    while stream.send_audio(frame):  # never waits: nothing to time out
        sent += 1
        assert sent < 200_000, "never dropped"
    assert stream.dropped_audio == 1
    # Control still goes out (queued behind the audio) without waiting.
    await asyncio.wait_for(stream.send('{"type": "mark", "name": "m"}'), 2.0)
    session.ws.transport.resume_reading()
    await stream.aclose()


async def test_wss_is_verified_against_the_system_and_the_private_ca(
    tls_pipeline: PipelineServer, ca_file: Path
) -> None:
    settings = PipelineSettings(connect_timeout_s=5)
    trusted = client_context(TlsSettings(ca_file=ca_file))
    stream = await PipelineConnection.open(tls_pipeline.url, {}, settings, trusted)
    await stream.send('{"type": "start", "callId": "c1"}')
    assert (await tls_pipeline.session()).call_id == "c1"
    await stream.aclose()
    # The system's trust store (explicitly, and websockets' own default) does not know the CA.
    for tls in (client_context(TlsSettings()), None):
        with pytest.raises(PipelineError) as caught:
            await PipelineConnection.open(tls_pipeline.url, {}, settings, tls)
        assert str(caught.value).startswith(
            f"cannot open the pipeline websocket {tls_pipeline.url}: certificate verify failed: "
            "unable to get local issuer certificate"
        )
        assert "tls.ca_file" in str(caught.value)
    # The CA is trusted, but the certificate is for 127.0.0.1, not localhost.
    with pytest.raises(PipelineError, match="certificate verify failed: Hostname mismatch"):
        await PipelineConnection.open(
            tls_pipeline.url.replace("127.0.0.1", "localhost"), {}, settings, trusted
        )
    # A context is only for wss://; a ws:// URL is opened without it.
    plain = PipelineServer()
    await plain.start()
    try:
        stream = await PipelineConnection.open(plain.url, {}, settings, trusted)
        await stream.aclose()
    finally:
        await plain.stop()
