from __future__ import annotations

import array
import asyncio
import contextlib
import os
import shutil
import socket
import sqlite3
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import cast

import aiohttp
import pytest

from bridge.audio import rms, sine, tone_share
from bridge.errors import ConfigError, PbxAuthError
from bridge.overload import EventLoopLag
from bridge.pbx.freeswitch.backend import FreeswitchBackend
from bridge.protocol import esl
from bridge.recording import sign
from bridge.service import Service
from bridge.settings import Settings
from tests.conftest import offer_accepted, recorded_call
from tests.esl_peer import (
    CALL,
    ORPHAN,
    PASSWORD,
    SHUTDOWN,
    TRANSFER_FAILS,
    TRANSFER_OK,
    EslPeer,
)
from tests.pipeline_server import PipelineServer, PipelineSession
from tests.test_store import corrupt_calls_table
from tests.webhook_sink import WebhookSink


async def test_health_reports_the_store_and_pbx_links(service: Service) -> None:
    report = await service.health()
    assert report["status"] == "ok" and report["store"] == "ok" and report["activeCalls"] == 0
    service.pbx_links["asterisk"] = False
    assert (await service.health())["status"] == "degraded"
    service.pbx_links["asterisk"] = True
    await service.store.aclose()
    report = await service.health()
    assert report["status"] == "degraded" and report["store"] == "unavailable"


async def test_health_and_metrics_show_the_load(make_settings: Callable[..., Settings]) -> None:
    """[performance] overload is visible: the event loop's lag, and whether new calls would be
    refused (a saturated machine stays healthy: its calls go on, new ones go elsewhere)."""
    service = Service(make_settings(service={"max_event_loop_lag_ms": 100}))
    await service.start()
    try:
        await check_the_load_report(service)
    finally:
        await service.aclose()


async def check_the_load_report(service: Service) -> None:
    now = time.monotonic()
    load = (await service.health())["load"]
    assert load["refusingNewCalls"] is None and load["assistantFramesShed"] == 0
    assert load["maxEventLoopLagMs"] == 100
    service.event_loop_lag = EventLoopLag()
    for tick in range(10):  # one late sample in the last second: a burst, not saturation
        service.event_loop_lag.observe(0.5 if tick == 5 else 0.001, now - 0.9 + tick / 10)
    load = (await service.health())["load"]
    assert load["eventLoopLagPeakMs"] >= 500 and load["refusingNewCalls"] is None
    service.event_loop_lag = EventLoopLag()
    for tick in range(10):  # late on every sample of the last second: saturated
        service.event_loop_lag.observe(0.5, now - 0.9 + tick / 10)
    report = await service.health()
    assert report["load"]["eventLoopLagMs"] >= 500
    assert report["load"]["refusingNewCalls"] == "event_loop_lag"
    assert report["status"] == "ok"


async def test_health_is_503_naming_the_file_when_the_store_is_damaged(service: Service) -> None:
    path = service.settings.store.path
    await service.store.save_calls(
        [
            {"id": f"c{n}", "createdAt": "2026-01-01T00:00:00.000Z", "updatedAt": "x"}
            | {"status": "ended", "pad": "x" * 400}
            for n in range(300)
        ]
    )
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page into the main file
    corrupt_calls_table(path)
    service.store._integrity_check_interval_s = 0  # due now, not in an hour
    url = f"http://127.0.0.1:{service.api_port}/health"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        report = await response.json()
    assert response.status == 503 and report["status"] == "degraded"
    assert report["store"] == "damaged" and f"the store {path} is damaged" in report["storeDetail"]


async def test_metrics_text(service: Service) -> None:
    text = service.metrics_text().decode()
    for name in (
        "sipbridge_calls_active",
        "sipbridge_webhook_seconds",
        "sipbridge_pbx_link_up",
        "sipbridge_store_errors",
    ):
        assert f"# HELP {name}" in text


async def test_a_busy_port_fails_start_and_leaves_nothing_running(
    make_settings: Callable[..., Settings],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = Service(make_settings(api={"port": port}))
        with pytest.raises(OSError):
            await service.start()
    assert service._runner is None and service._callflow is None
    with pytest.raises(Exception, match="not open"):
        await service.store.org_id()


async def test_a_ca_file_without_certificates_fails_start(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    service = Service(make_settings(tls={"ca_file": str(junk)}))
    with pytest.raises(ConfigError, match="tls.ca_file: cannot load CA certificates"):
        await service.start()
    assert service._runner is None and service._callflow is None


async def test_drain_waits_for_live_calls(service: Service, pipeline: PipelineServer) -> None:
    call, pbx = await offer_accepted(
        service, "alice", {"name": "A", "sipbridge": {"pipeline": {"url": pipeline.url}}}
    )
    assert not await service.drain(0.05)  # the call is still live
    draining = asyncio.ensure_future(service.drain(10))
    await asyncio.sleep(0)
    service.callflow.hung_up("test", "p1")
    assert await draining
    assert call.ended_reason is not None and call.ended_reason.value == "customer-ended-call"


async def test_org_id_from_settings(make_settings: Callable[..., Settings]) -> None:
    service = Service(make_settings(api={"org_id": "org-42"}))
    await service.start()
    try:
        assert (await service.resources.create("assistant", {}))["orgId"] == "org-42"
    finally:
        await service.aclose()


class FreeswitchAudio(asyncio.DatagramProtocol):
    """FreeSWITCH's side of a call's unicast stream: sends the caller, keeps what it is sent."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.changed = asyncio.Event()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)
        self.changed.set()

    async def play(self, pcm: bytes, to: tuple[str, int]) -> None:
        """20 ms datagrams on an absolute schedule, as FreeSWITCH sends them."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        for index, offset in enumerate(range(0, len(pcm), 320)):
            self.transport.sendto(pcm[offset : offset + 320], to)
            delay = start + (index + 1) * 0.02 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)

    async def wait_frames(self, count: int, timeout: float = 10.0) -> None:
        async def wait() -> None:
            while len(self.received) < count:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)


async def test_a_call_through_freeswitch_from_park_to_report(
    make_settings: Callable[..., Settings], pipeline: PipelineServer, sink: WebhookSink
) -> None:
    """The whole FreeSWITCH path: a parked INVITE over the (capture-built) event socket,
    routing, the pipeline, unicast audio both ways, DTMF events, the caller's hangup."""
    peer = EslPeer()
    await peer.start()
    loop = asyncio.get_running_loop()
    transport, freeswitch_audio = await loop.create_datagram_endpoint(
        FreeswitchAudio, local_addr=("127.0.0.1", 0)
    )

    async def script(session: PipelineSession) -> None:
        await session.send(sine(1300, 1.0, 16000))

    pipeline.script = script
    freeswitch_port = transport.get_extra_info("sockname")[1]
    service = Service(
        make_settings(
            freeswitch={
                "enabled": True,
                "port": peer.port,
                "password": PASSWORD,
                # FreeSWITCH's side of the unicast pair is this test's socket.
                "unicast_port_min": freeswitch_port,
                "unicast_port_max": freeswitch_port,
            },
            webhooks={"default_server_url": sink.url},
        )
    )
    await service.start()
    try:
        await service.wait_link("freeswitch", up=True)
        assistant = await service.resources.create(
            "assistant",
            {"firstMessage": "Hi {{first_name}}", "sipbridge": {"pipeline": {"url": pipeline.url}}},
        )
        await service.resources.create(
            "phone_number", {"sipUri": "sip:demo@127.0.0.1", "assistantId": assistant["id"]}
        )
        peer.park(CALL)
        unicast = await peer.wait_command(f"sendmsg {CALL}\ncall-command: unicast")
        assert f"sendmsg {CALL}\ncall-command: execute\nexecute-app-name: answer" in (peer.commands)
        assert not any(c.startswith("api uuid_answer") for c in peer.commands)
        fields = dict(line.split(": ", 1) for line in unicast.splitlines()[1:])
        ours = (fields["remote-ip"], int(fields["remote-port"]))
        assert fields["local-port"] == str(freeswitch_port) and fields["transport"] == "udp"
        session = await pipeline.session()
        assert session.start is not None
        assert session.start["assistant"]["firstMessage"] == "Hi John"
        assert session.start["headers"]["X-Account-Id"] == "42"
        # The caller's 700 Hz, from FreeSWITCH's side of the unicast pair (then silence:
        # FreeSWITCH sends a frame every 20 ms while unicast runs).
        await freeswitch_audio.play(sine(700, 0.6) + bytes(16000), ours)
        heard = await session.wait_audio(16000)  # 0.5 s at 16 kHz
        assert tone_share(heard[3200:16000], 16000, 700) > 0.9
        # The pipeline's 1300 Hz reply comes back to where FreeSWITCH sent from, paced.
        await freeswitch_audio.wait_frames(30)
        replies = [f for f in freeswitch_audio.received if tone_share(f, 8000, 1300) > 0.9]
        assert len(replies) >= 20 and {len(f) for f in freeswitch_audio.received} == {320}
        # The caller's keys arrive as FreeSWITCH DTMF events.
        peer.press(CALL)
        await session.wait_for(
            lambda s: len([m for m in s.controls if m.get("type") == "dtmf"]) == 3
        )
        assert [m["digit"] for m in session.controls if m.get("type") == "dtmf"] == ["1", "2", "#"]
        # The caller hangs up.
        peer.hang_up(CALL)
        report = await sink.wait_for_message("end-of-call-report")
        assert report.message["endedReason"] == "customer-ended-call"
        assert (
            report.message["call"]["phoneCallProviderDetails"]["sip"]["headers"]["X-Pct"]
            == "100%41off"
        )
        stop = await session.wait_control("stop")
        assert stop["reason"] == "customer-ended-call"
        # The caller hung up: nothing to hang up at FreeSWITCH.
        assert not [c for c in peer.requests if c.startswith("api uuid_kill")]
        await session.closed.wait()
        backend = service.backends["freeswitch"]
        assert isinstance(backend, FreeswitchBackend) and len(backend.unicast) == 0
    finally:
        await service.aclose()
        transport.close()
        await peer.stop()
    # Recorded (Vapi's default): the caller left, what the caller heard right, tick by tick.
    media = report.message["call"]["sipbridge"]["media"]
    path = service.recordings_path / f"{report.message['call']['id']}.stereo.wav"
    with wave.open(str(path), "rb") as recording:
        assert recording.getnframes() == media["recordedFrames"] * 160
        assert recording.getnchannels() == 2 and recording.getframerate() == 8000
        samples = array.array("h", recording.readframes(recording.getnframes()))
    assert media["recordedFrames"] >= media["framesToCaller"] and media["recordingFailed"] == 0
    left, right = samples[0::2].tobytes(), samples[1::2].tobytes()
    # The 0.6 s the caller said, byte for byte, then silence. A tick that found no new caller
    # frame (the caller's frames and the writer's ticks are independent clocks; on a busy
    # machine a frame arrives a tick late) records silence there: the call's own timeline.
    frames = [left[offset : offset + 320] for offset in range(0, len(left), 320)]
    voiced = [index for index, frame in enumerate(frames) if rms(frame)]
    assert b"".join(frames[index] for index in voiced) == sine(700, 0.6)
    assert voiced[-1] - voiced[0] < 30 + 5  # at most a few ticks late inside the tone
    ticks = [right[offset : offset + 320] for offset in range(0, len(right), 320)]
    reply_ticks = [tone_share(tick, 8000, 1300) > 0.9 for tick in ticks]
    assert sum(reply_ticks) == media["assistantFramesPlayed"] == 50


async def freeswitch_service(
    make_settings: Callable[..., Settings], peer: EslPeer, **freeswitch: object
) -> Service:
    return Service(
        make_settings(
            freeswitch={"enabled": True, "port": peer.port, "password": PASSWORD, **freeswitch}
        )
    )


async def test_a_wrong_freeswitch_password_fails_start_cleanly(
    make_settings: Callable[..., Settings],
) -> None:
    peer = EslPeer()
    await peer.start()
    try:
        service = await freeswitch_service(make_settings, peer, password="wrong")
        with pytest.raises(PbxAuthError, match="refused the event socket password"):
            await service.start()
        assert service._runner is None and service.backends == {}
        with pytest.raises(Exception, match="not open"):
            await service.store.org_id()  # the rest was stopped too
        await service.aclose()  # and a second stop is harmless
    finally:
        await peer.stop()


async def test_a_transfer_asked_by_the_pipeline_leaves_the_freeswitch_channel_up(
    make_settings: Callable[..., Settings], pipeline: PipelineServer
) -> None:
    peer = EslPeer()
    await peer.start()
    loop = asyncio.get_running_loop()
    transport, freeswitch_audio = await loop.create_datagram_endpoint(
        FreeswitchAudio, local_addr=("127.0.0.1", 0)
    )
    freeswitch_port = transport.get_extra_info("sockname")[1]

    async def script(session: PipelineSession) -> None:
        await session.send_json(
            {
                "type": "transfer",
                "destination": {"type": "sip", "sipUri": "sip:agent@pbx.example.com"},
            }
        )

    pipeline.script = script
    service = await freeswitch_service(
        make_settings, peer, unicast_port_min=freeswitch_port, unicast_port_max=freeswitch_port
    )
    await service.start()
    try:
        await service.wait_link("freeswitch", up=True)
        assistant = await service.resources.create(
            "assistant", {"sipbridge": {"pipeline": {"url": pipeline.url}}}
        )
        await service.resources.create(
            "phone_number", {"sipUri": "sip:demo@127.0.0.1", "assistantId": assistant["id"]}
        )
        peer.park(TRANSFER_OK)
        unicast = await peer.wait_command(f"sendmsg {TRANSFER_OK}\ncall-command: unicast")
        fields = dict(line.split(": ", 1) for line in unicast.splitlines()[1:])
        await freeswitch_audio.play(
            sine(700, 0.1), (fields["remote-ip"], int(fields["remote-port"]))
        )
        await peer.wait_command(f"api uuid_transfer {TRANSFER_OK} sipbridge_transfer XML sipbridge")
        session = await pipeline.session()
        await session.closed.wait()
        call = service.callflow.find_pbx_call("freeswitch", TRANSFER_OK)
        assert call is None or call.ended_reason is not None
        # Everything the session's end could send has been answered by now.
        backend = service.backends["freeswitch"]
        assert isinstance(backend, FreeswitchBackend)
        await backend.link.command(esl.command("api status"))
        assert not [c for c in peer.requests if c.startswith("api uuid_kill")]
    finally:
        await service.aclose()
        transport.close()
        await peer.stop()


def copy_database(source: Path, target: Path) -> None:
    """An SQLite database as it is on disk now, its write-ahead log included."""
    for suffix in ("", "-wal", "-shm"):
        part = source.with_name(source.name + suffix)
        if part.exists():
            shutil.copy(part, target.with_name(target.name + suffix))


class FreeswitchLab:
    """A service on the capture-built FreeSWITCH peer, with FreeSWITCH's side of the unicast
    pair, a pipeline and a webhook sink; the number sip:demo@127.0.0.1 (the live captures'
    calls) served by an assistant on the pipeline."""

    def __init__(
        self,
        make_settings: Callable[..., Settings],
        pipeline: PipelineServer,
        sink: WebhookSink,
        store: str | None = None,
    ) -> None:
        self.make_settings = make_settings
        self.pipeline = pipeline
        self.sink = sink
        self.store = store
        self.peer = EslPeer()
        self.audio = FreeswitchAudio()

    async def __aenter__(self) -> FreeswitchLab:
        await self.peer.start()
        loop = asyncio.get_running_loop()
        self.transport, self.audio = await loop.create_datagram_endpoint(
            FreeswitchAudio, local_addr=("127.0.0.1", 0)
        )
        port = self.transport.get_extra_info("sockname")[1]
        sections: dict[str, dict[str, object]] = {
            "freeswitch": {
                "enabled": True,
                "port": self.peer.port,
                "password": PASSWORD,
                "unicast_port_min": port,
                "unicast_port_max": port,
            },
            "webhooks": {"default_server_url": self.sink.url},
        }
        if self.store is not None:
            sections["store"] = {"path": self.store}
        self.service = Service(self.make_settings(**sections))
        await self.service.start()
        await self.service.wait_link("freeswitch", up=True)
        return self

    async def serve(self) -> None:
        assistant = await self.service.resources.create(
            "assistant", {"sipbridge": {"pipeline": {"url": self.pipeline.url}}}
        )
        await self.service.resources.create(
            "phone_number", {"sipUri": "sip:demo@127.0.0.1", "assistantId": assistant["id"]}
        )

    async def answered(self, uniqueid: str) -> tuple[str, int]:
        """Parks the captured call; once accepted, where its audio goes (our unicast socket)."""
        self.peer.park(uniqueid)
        unicast = await self.peer.wait_command(f"sendmsg {uniqueid}\ncall-command: unicast")
        fields = dict(line.split(": ", 1) for line in unicast.splitlines()[1:])
        return fields["remote-ip"], int(fields["remote-port"])

    async def __aexit__(self, *exc: object) -> None:
        await self.service.aclose()
        self.transport.close()
        await self.peer.stop()


async def test_a_transfer_freeswitch_cannot_complete_leaves_the_caller_with_the_assistant(
    make_settings: Callable[..., Settings], pipeline: PipelineServer, sink: WebhookSink
) -> None:
    """faults/06: the bridge failed, and the caller was dropped 0.3 s later as
    assistant-forwarded-call. Now the call goes on, as docs/pipeline.md promises."""

    async def script(session: PipelineSession) -> None:
        await session.wait_audio(3200)
        await session.send_json(
            {"type": "transfer", "destination": {"type": "sip", "sipUri": "sip:nobody@x.test"}}
        )
        heard = len(session.audio)
        await session.wait_audio(heard + 8000)  # the caller is heard again after the failure
        await session.send_json({"type": "end-call"})

    pipeline.script = script
    async with FreeswitchLab(make_settings, pipeline, sink) as lab:
        await lab.serve()
        ours = await lab.answered(TRANSFER_FAILS)
        await lab.audio.play(sine(600, 0.4), ours)
        await lab.peer.wait_command(f"api uuid_transfer {TRANSFER_FAILS}")
        # Parked again: the same unicast pair starts again, and the caller is heard.
        await lab.peer.wait_command(f"sendmsg {TRANSFER_FAILS}\ncall-command: unicast", count=2)
        await lab.audio.play(sine(600, 0.6), ours)
        report = await sink.wait_for_message("end-of-call-report")
        assert report.message["endedReason"] == "assistant-ended-call"
        statuses = [m["status"] for m in sink.messages("status-update")]
        assert statuses == ["ringing", "in-progress", "forwarding", "in-progress", "ended"]
        assert f"api uuid_kill {TRANSFER_FAILS}" in lab.peer.requests


async def test_freeswitch_shutting_down_is_not_the_customer_ending_the_call(
    make_settings: Callable[..., Settings], pipeline: PipelineServer, sink: WebhookSink
) -> None:
    """faults/05: SYSTEM_SHUTDOWN, send_bye was recorded as customer-ended-call."""
    async with FreeswitchLab(make_settings, pipeline, sink) as lab:
        await lab.serve()
        ours = await lab.answered(SHUTDOWN)
        await lab.audio.play(sine(600, 0.2), ours)
        session = await pipeline.session()
        lab.peer.shut_down(SHUTDOWN)
        report = await sink.wait_for_message("end-of-call-report")
        assert report.message["endedReason"] == "call.in-progress.sip-completed-call"
        assert (await session.wait_control("stop"))["reason"] == (
            "call.in-progress.sip-completed-call"
        )
        assert not [c for c in lab.peer.requests if c.startswith("api uuid_kill")]


async def test_calls_a_killed_sipbridge_left_are_settled_once_by_the_next(
    make_settings: Callable[..., Settings],
    pipeline: PipelineServer,
    sink: WebhookSink,
    tmp_path: Path,
) -> None:
    """faults/04: after a SIGKILL the record stayed in-progress forever, with no report, and the
    channel (parked, silent: its audio died with the process) was left to the caller."""
    async with FreeswitchLab(make_settings, pipeline, sink) as first:
        await first.serve()
        ours = await first.answered(ORPHAN)
        await first.audio.play(sine(600, 0.2), ours)
        await sink.wait_for_message("status-update", status="in-progress")
        assert await first.service.recorder.flush()
        # What the killed process left on disk: the store as it was mid-call.
        left = tmp_path / "left.sqlite3"
        copy_database(Path(first.service.settings.store.path), left)
    sink.requests.clear()
    second = FreeswitchLab(make_settings, pipeline, sink, store=str(left))
    second.peer.hold(ORPHAN)  # the caller is still on the line, in silence
    async with second:
        report = await sink.wait_for_message("end-of-call-report")
        assert report.message["endedReason"] == "call.in-progress.error-vapifault-worker-died"
        assert [m["status"] for m in sink.messages("status-update")] == ["ended"]
        await second.peer.wait_command(f"api uuid_kill {ORPHAN}")
        record = await second.service.get_call(report.message["call"]["id"])
        assert record is not None and record["status"] == "ended"
    assert len(sink.messages("end-of-call-report")) == 1


async def test_recordings_past_their_retention_go_at_start(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    directory = tmp_path / "kept-recordings"
    directory.mkdir()
    old, recent = directory / "old.stereo.wav", directory / "recent.stereo.wav"
    for path in (old, recent):
        path.write_bytes(b"RIFF")
    stamp = time.time() - 3 * 86400
    os.utime(old, (stamp, stamp))
    service = Service(make_settings(recordings={"path": str(directory), "retention_days": 2}))
    await service.start()
    try:
        await asyncio.wait_for(service.recordings_cleaned.wait(), 5)
        assert not old.exists() and recent.exists()
    finally:
        await service.aclose()


async def test_a_recording_that_cannot_be_written_never_costs_the_call(
    make_settings: Callable[..., Settings],
    pipeline: PipelineServer,
    sink: WebhookSink,
    tmp_path: Path,
) -> None:
    not_a_directory = tmp_path / "taken"
    not_a_directory.write_text("a file where the recordings should go")
    service = Service(
        make_settings(
            recordings={"path": str(not_a_directory)}, webhooks={"default_server_url": sink.url}
        )
    )
    await service.start()
    try:
        await recorded_call(service, pipeline, {"sipbridge": {"pipeline": {"url": pipeline.url}}})
        report = (await sink.wait_for_message("end-of-call-report")).message
    finally:
        await service.aclose()
    assert report["endedReason"] == "customer-ended-call"
    assert report["call"]["sipbridge"]["media"]["recordingFailed"] == 1
    assert "recordingUrl" not in report["artifact"]
    assert b"sipbridge_recordings_stopped_total 1.0" in service.metrics.render()


async def test_rotating_the_recording_link_key_breaks_no_link_already_sent(
    make_settings: Callable[..., Settings],
) -> None:
    """Links signed by the database's generated key, then by a configured key, keep working
    after each change, until they expire; the newest key signs from then on."""
    expires = int(time.time()) + 3600

    async def signature_by(service: Service) -> str:
        assert service._recording_links is not None
        return sign(service._recording_links.secret, "c1", "stereo", expires)

    first = Service(make_settings())
    await first.start()
    by_stored_key = await signature_by(first)
    await first.aclose()
    configured = {"url_secret": "key-two-0123456789abcdef"}
    second = Service(make_settings(recordings=configured))
    await second.start()
    by_key_two = await signature_by(second)
    assert second.recording_link_valid("c1", "stereo", expires=expires, signature=by_stored_key)
    await second.aclose()
    rotated = {
        "url_secret": "key-three-0123456789abcdef",
        "previous_url_secrets": ["key-two-0123456789abcdef"],
    }
    third = Service(make_settings(recordings=rotated))
    await third.start()
    try:
        for signature in (by_stored_key, by_key_two, await signature_by(third)):
            assert third.recording_link_valid("c1", "stereo", expires=expires, signature=signature)
        assert by_key_two != await signature_by(third)
        assert not third.recording_link_valid(
            "c1", "stereo", expires=expires, signature=sign(b"unknown", "c1", "stereo", expires)
        )
    finally:
        await third.aclose()
