"""Benchmark of sipbridge's per-frame media path: AudioSocket leg ⇄ MediaSession ⇄ pipeline.

Three processes on loopback, so that no side's work disturbs another's clock:

- ``bridge``: sipbridge's media side as the service wires it (AudioSocketServer, one
  PipelineConnection, dialect, Transcoder, PlayoutBuffer and MediaSession per call). Measured.
- ``pbx``: plays Asterisk: N AudioSocket connections, each sending 20 ms of caller audio every
  20 ms on an absolute schedule and timestamping every frame sipbridge sends back.
- ``pipeline``: a websockets server playing a TTS pipeline: every 3 s per call it sends a 2 s
  reply as fast as it is made (100 ms chunks), then after 1 s a ``clear`` (barge-in).

Every timestamp is ``time.monotonic()``, CLOCK_MONOTONIC, which all processes on one machine
share, so times taken in different processes can be subtracted. Results:

- pacing jitter toward the PBX: |inter-arrival − 20 ms| of sipbridge's frames at the PBX;
- clear-to-silence: from the pipeline sending ``clear`` to the first silent frame at the PBX,
  and how many reply frames still arrived after the clear;
- caller → pipeline latency: each caller frame carries its index in its first three μ-law
  bytes (which survive both dialects' conversions exactly);
- sipbridge's CPU time per call-second.

Usage (writes benchmarks/results/media_path.json and prints a table)::

    .venv/bin/python benchmarks/media_path.py --calls 1 50 100 200 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import json
import math
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from bridge import __version__
from bridge.audio import (
    FRAME_MS,
    PlayoutBuffer,
    Transcoder,
    frame_bytes,
    pcm_to_ulaw,
    sine,
    ulaw_to_pcm,
)
from bridge.media.clock import FrameClock
from bridge.media.session import MediaSession
from bridge.pbx.asterisk.audiosocket import AudioSocketLeg, AudioSocketServer
from bridge.pbx.freeswitch.unicast import UnicastLeg, UnicastMedia
from bridge.pipeline import PipelineConnection
from bridge.protocol import audiosocket as wire
from bridge.protocol.pipeline import Dialect, RawDialect, SessionInfo
from bridge.protocol.twilio import TwilioDialect
from bridge.recordings import Recorder, Recording, RecordingWriter
from bridge.settings import MediaSettings, PipelineSettings

FRAME_S = FRAME_MS / 1000
PCM_FRAME = frame_bytes(8000)  # 320 bytes: 20 ms of 8 kHz s16le
SILENT_PCM = bytes(PCM_FRAME)
REPLY_PERIOD_S = 3.0
REPLY_S = 2.0
CLEAR_AFTER_S = 1.0
RESULTS = Path(__file__).parent / "results"
# raw16 resamples both ways (8 ↔ 16 kHz), as the raw dialect's default does; its caller frames
# lose their index in the resampler, so it has no latency figure.
PIPELINE_RATES = {"raw": 8000, "raw16": 16000, "twilio": 8000}
# The PBX legs the simulator can play: Asterisk's AudioSocket (TCP), FreeSWITCH's unicast
# (UDP datagrams of L16, the socket bound per call as the backend asks over ESL).
LEG_NAMES = {"asterisk": "AudioSocket", "freeswitch": "unicast"}


def cpu_seconds() -> float:
    """This process's CPU time so far (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---- caller frames that carry their index -----------------------------------------------------


def caller_frame(index: int, filler: bytes) -> bytes:
    """20 ms of 8 kHz PCM whose μ-law encoding starts with ``index`` in base-100 digits.

    μ-law bytes 0..99 decode and re-encode to themselves, so the index survives sipbridge's
    conversions (none for raw 8 kHz PCM, PCM → μ-law for twilio).
    """
    digits = bytes(((index // 10000) % 100, (index // 100) % 100, index % 100))
    return ulaw_to_pcm(digits + filler[3:])


def frame_index(ulaw: bytes) -> int | None:
    """The index :func:`caller_frame` put in, or None for a frame that carries none."""
    if len(ulaw) < 3 or any(b > 99 for b in ulaw[:3]):
        return None
    return ulaw[0] * 10000 + ulaw[1] * 100 + ulaw[2]


# ---- the measured side: sipbridge's media path ------------------------------------------------


async def run_bridge(
    pipeline_url: str, dialect_name: str, state: Path, pbx: str, record: bool = False
) -> None:
    settings = PipelineSettings(ping_interval_s=5.0, ping_timeout_s=5.0)
    playout_frames = MediaSettings().playout_max_ms // FRAME_MS
    stats: list[dict[str, Any]] = []

    class NoControl:
        """The call's side of the pipeline's requests: none are made here."""

        async def transfer(self, destination: Any) -> bool:
            return False

        async def send_dtmf(self, digits: str) -> None:
            return None

        def report(self, kind: str, payload: Any) -> None:
            return None

    conversations: set[asyncio.Task[None]] = set()
    frame_clock = FrameClock()  # one for every call, as Conversations has
    # With --record, every call is recorded as the service records it: the tap on the 20 ms
    # path, one writer thread for all calls, stereo and mono WAV files.
    recording_writer = RecordingWriter()
    if record:
        recording_writer.start()

    def on_leg(call_id: str, leg: AudioSocketLeg | UnicastLeg) -> None:
        # The call flow's part: run the conversation, then free the leg.
        task = asyncio.ensure_future(converse(call_id, leg))
        conversations.add(task)
        task.add_done_callback(conversations.discard)

    async def converse(call_id: str, leg: AudioSocketLeg | UnicastLeg) -> None:
        stream = await PipelineConnection.open(pipeline_url, {}, settings)
        info = SessionInfo(
            call_id=call_id,
            stream_id=str(uuid.uuid4()),
            pbx_call_id=call_id,
            customer={"number": "+15551230000"},
            called_uri="sip:bench@127.0.0.1",
            headers={},
            variables={},
            assistant={"name": "bench"},
            phone_number=None,
            encoding="mulaw" if dialect_name == "twilio" else "pcm_s16le",
            sample_rate=PIPELINE_RATES[dialect_name],
        )
        dialect: Dialect = (
            TwilioDialect(info, "bench")
            if dialect_name == "twilio"
            else RawDialect("pcm_s16le", PIPELINE_RATES[dialect_name])
        )
        for message in dialect.opening(info):
            await stream.send(message)
        session = MediaSession(
            leg=leg,
            stream=stream,
            dialect=dialect,
            transcoder=Transcoder(dialect.encoding, dialect.sample_rate, leg.rate),
            playout=PlayoutBuffer(frame_bytes(leg.rate), max_frames=playout_frames),
            control=NoControl(),
            ended=asyncio.Event(),
            frame_clock=frame_clock,
            taps=[Recorder(Recording(call_id, state / "recordings"), recording_writer)]
            if record
            else [],
        )
        result = await session.run()
        await session.finish(result.reason.value if result.reason else "ended")
        await leg.aclose()
        s = session.stats
        stats.append(
            {
                "framesToPbx": s.frames_to_pbx,
                "framesFromPbx": s.frames_from_pbx,
                "droppedToPbx": s.dropped_to_pbx,
                "droppedToPipeline": s.dropped_to_pipeline,
                "lateFrames": s.late_frames,
                "maxLatenessMs": round(s.max_lateness_s * 1000, 3),
            }
        )

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if pbx == "asterisk":
        server = AudioSocketServer("127.0.0.1", 0, 4096, on_leg)
        await server.start()
        port, close = server.port, server.aclose
    else:
        unicast = UnicastMedia("127.0.0.1", None, on_leg=on_leg, start_timeout_s=30)
        control = await asyncio.start_server(
            lambda r, w: unicast_control(unicast, r, w), "127.0.0.1", 0
        )
        port = control.sockets[0].getsockname()[1]

        async def close() -> None:
            control.close()
            await unicast.aclose()

    before = resource.getrusage(resource.RUSAGE_SELF)
    print(port, flush=True)
    await stop.wait()
    after = resource.getrusage(resource.RUSAGE_SELF)
    await close()
    if record:
        recording_writer.close()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    (state / "bridge.json").write_text(json.dumps({"cpuSeconds": cpu, "sessions": stats}))


async def unicast_control(
    unicast: UnicastMedia, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """What the FreeSWITCH backend does over ESL, as lines: ``open CALL HOST PORT`` binds the
    call's unicast socket (answered with its port), ``hangup CALL`` is CHANNEL_HANGUP."""
    async for line in reader:
        command, call_id, *where = line.decode().split()
        if command == "open":
            _, port = await unicast.open(call_id, call_id, (where[0], int(where[1])))
            writer.write(f"{port}\n".encode())
        else:
            unicast.hung_up(call_id)
    writer.close()


# ---- the PBX side -----------------------------------------------------------------------------


class PbxCall(asyncio.Protocol):
    """One AudioSocket connection, as Asterisk makes it."""

    def __init__(self) -> None:
        self.decoder = wire.FrameDecoder(4096)
        self.arrivals: list[float] = []
        self.silent: list[bool] = []
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.decoder.receive_data(data)
        for frame in self.decoder.events_received():
            if isinstance(frame, wire.Audio):
                self.arrivals.append(now)
                self.silent.append(frame.pcm == SILENT_PCM)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()


class PbxUnicastCall(asyncio.DatagramProtocol):
    """One call's unicast socket, as FreeSWITCH binds it: it sends the caller's frames from
    here and plays what sipbridge sends back."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self.silent: list[bool] = []

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.arrivals.append(time.monotonic())
        self.silent.append(data == SILENT_PCM)


async def run_pbx(port: int, calls: int, seconds: float, state: Path, pbx: str) -> None:
    """Starts the calls spread over one second, as calls arrive in life (all at once would
    line every call's 20 ms frame up at the same instant, an artificial worst case)."""
    loop = asyncio.get_running_loop()
    filler = pcm_to_ulaw(sine(440, 0.02, 8000, 0.3))
    frames = int(seconds / FRAME_S)
    sent: dict[str, list[float]] = {}
    legs: dict[str, PbxCall] = {}
    begin = loop.time() + 0.2

    async def speak(call_id: str, send: Callable[[int], object]) -> None:
        """The caller's frames, one every 20 ms on an absolute schedule, each timestamped."""
        times = sent[call_id] = []
        start = loop.time() + 0.3  # the pipeline connects meanwhile, as while a call rings
        for index in range(frames):
            delay = start + index * FRAME_S - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            send(index)
            times.append(time.monotonic())

    unicast_calls: dict[str, PbxUnicastCall] = {}
    control: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    control_lock = asyncio.Lock()
    if pbx == "freeswitch":
        control = await asyncio.open_connection("127.0.0.1", port)

    async def unicast_call(number: int) -> None:
        assert control is not None
        call_id = str(uuid.uuid4())
        start = begin + number / calls
        await asyncio.sleep(max(0.0, start - loop.time()))
        transport, protocol = await loop.create_datagram_endpoint(
            PbxUnicastCall, local_addr=("127.0.0.1", 0)
        )
        unicast_calls[call_id] = protocol
        host, own_port = transport.get_extra_info("sockname")[:2]
        async with control_lock:
            control[1].write(f"open {call_id} {host} {own_port}\n".encode())
            bridge_port = int(await control[0].readline())
        destination = ("127.0.0.1", bridge_port)
        await speak(
            call_id, lambda index: transport.sendto(caller_frame(index, filler), destination)
        )
        async with control_lock:
            control[1].write(f"hangup {call_id}\n".encode())
        transport.close()

    async def call(number: int) -> None:
        if pbx == "freeswitch":
            await unicast_call(number)
            return
        call_id = str(uuid.uuid4())
        start = begin + number / calls
        await asyncio.sleep(max(0.0, start - loop.time()))
        _, protocol = await loop.create_connection(PbxCall, "127.0.0.1", port)
        legs[call_id] = protocol
        assert protocol.transport is not None
        transport = protocol.transport
        transport.write(wire.encode_call_id(uuid.UUID(call_id)))
        await speak(
            call_id, lambda index: transport.write(wire.encode_audio(caller_frame(index, filler)))
        )
        transport.write(wire.encode_hangup())
        await protocol.closed.wait()

    await asyncio.gather(*(call(number) for number in range(calls)))
    if control is not None:
        control[1].close()
    ends: dict[str, PbxCall | PbxUnicastCall] = {**legs, **unicast_calls}
    (state / "pbx.json").write_text(
        json.dumps(
            {
                "cpuSeconds": cpu_seconds(),
                "sent": sent,
                "calls": {
                    call_id: {"arrivals": p.arrivals, "silent": p.silent}
                    for call_id, p in ends.items()
                },
            }
        )
    )


# ---- the pipeline side ------------------------------------------------------------------------


async def run_pipeline(state: Path) -> None:
    received: dict[str, list[tuple[int, float]]] = {}
    clears: dict[str, list[float]] = {}

    async def session(ws: ServerConnection) -> None:
        first = json.loads(await ws.recv())
        twilio = first.get("event") == "connected"
        if twilio:
            first = json.loads(await ws.recv())
            call_id = first["start"]["customParameters"]["callId"]
            stream_sid, rate = first["streamSid"], 8000
        else:
            call_id, stream_sid = first["callId"], ""
            rate = int(first["audioFormat"]["sampleRate"])
        reply_pcm = sine(1000, REPLY_S, rate, 0.3)
        chunk = rate * 2 // 10  # 100 ms
        arrivals = received.setdefault(call_id, [])
        clear_times = clears.setdefault(call_id, [])

        def media(pcm: bytes) -> str | bytes:
            if not twilio:
                return pcm
            payload = base64.b64encode(pcm_to_ulaw(pcm)).decode()
            return json.dumps(
                {"event": "media", "streamSid": stream_sid, "media": {"payload": payload}}
            )

        replies = [media(reply_pcm[i : i + chunk]) for i in range(0, len(reply_pcm), chunk)]
        clear = json.dumps(
            {"event": "clear", "streamSid": stream_sid} if twilio else {"type": "clear"}
        )

        async def speak() -> None:
            loop = asyncio.get_running_loop()
            begin = loop.time() + 0.5
            for cycle in range(10_000):
                delay = begin + cycle * REPLY_PERIOD_S - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                for message in replies:
                    await ws.send(message)
                # A random phase: the clear must land anywhere within sipbridge's 20 ms frame
                # grid, or every sample would see the same wait.
                await asyncio.sleep(CLEAR_AFTER_S + random.uniform(0, FRAME_S))
                clear_times.append(time.monotonic())
                await ws.send(clear)

        speaker = asyncio.create_task(speak())
        try:
            async for message in ws:
                now = time.monotonic()
                if isinstance(message, bytes):
                    if rate != 8000:
                        continue
                    ulaw = pcm_to_ulaw(message[:6])
                else:
                    data = json.loads(message)
                    if data.get("event") != "media":
                        continue
                    ulaw = base64.b64decode(data["media"]["payload"])[:3]
                index = frame_index(ulaw)
                if index is not None:
                    arrivals.append((index, now))
        except ConnectionClosed:
            pass
        finally:
            speaker.cancel()

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with serve(session, "127.0.0.1", 0, compression=None, max_size=2**20) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(port, flush=True)
        await stop.wait()
    (state / "pipeline.json").write_text(
        json.dumps({"cpuSeconds": cpu_seconds(), "received": received, "clears": clears})
    )


# ---- orchestration and analysis ---------------------------------------------------------------


def percentile(values: Sequence[float], share: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    if not ms:
        return {"count": 0}
    return {
        "count": len(ms),
        "p50": round(percentile(ms, 0.50), 3),
        "p99": round(percentile(ms, 0.99), 3),
        "p999": round(percentile(ms, 0.999), 3),
        "max": round(max(ms), 3),
        "mean": round(statistics.fmean(ms), 3),
    }


def analyse(state: Path, calls: int, seconds: float) -> dict[str, Any]:
    pbx = json.loads((state / "pbx.json").read_text())
    pipeline = json.loads((state / "pipeline.json").read_text())
    bridge = json.loads((state / "bridge.json").read_text())
    jitter: list[float] = []
    clear_to_silence: list[float] = []
    frames_after_clear: list[int] = []
    for call_id, data in pbx["calls"].items():
        arrivals, silent = data["arrivals"], data["silent"]
        # Skip the first second: connection set-up, not steady state.
        steady = [t for t in arrivals if t >= arrivals[0] + 1.0] if arrivals else []
        jitter += [abs((b - a) - FRAME_S) for a, b in zip(steady, steady[1:], strict=False)]
        for cleared_at in pipeline["clears"].get(call_id, []):
            after = [i for i, t in enumerate(arrivals) if t >= cleared_at]
            if not after:
                continue
            first_silent = next((i for i in after if silent[i]), None)
            if first_silent is None:
                continue
            clear_to_silence.append(arrivals[first_silent] - cleared_at)
            frames_after_clear.append(sum(1 for i in after[: after.index(first_silent)]))
    latency: list[float] = []
    for call_id, sent in pbx["sent"].items():
        for index, received_at in pipeline["received"].get(call_id, []):
            if index < len(sent):
                latency.append(received_at - sent[index])
    sessions = bridge["sessions"]
    call_seconds = calls * seconds
    return {
        "calls": calls,
        "seconds": seconds,
        "pacingJitterToPbxMs": summary_ms(jitter),
        "clearToSilenceMs": summary_ms(clear_to_silence),
        "replyFramesAfterClear": {
            "max": max(frames_after_clear, default=0),
            "mean": round(statistics.fmean(frames_after_clear), 3) if frames_after_clear else 0,
        },
        "callerToPipelineLatencyMs": summary_ms(latency),
        "bridgeCpuPercentOfOneCore": round(100 * bridge["cpuSeconds"] / seconds, 1),
        "bridgeCpuMsPerCallSecond": round(1000 * bridge["cpuSeconds"] / call_seconds, 3),
        # The simulators share the machine: when bridge + these exceed the CPUs, sipbridge
        # waits for a core and its pacing suffers for reasons that are not its own.
        "pbxSimulatorCpuPercent": round(100 * pbx["cpuSeconds"] / seconds, 1),
        "pipelineSimulatorCpuPercent": round(100 * pipeline["cpuSeconds"] / seconds, 1),
        "sessions": len(sessions),
        "framesToPbx": sum(s["framesToPbx"] for s in sessions),
        "droppedToPbx": sum(s["droppedToPbx"] for s in sessions),
        # One per call is the frame that was due when the caller's hang-up had just arrived.
        "maxDroppedToPbxPerCall": max((s["droppedToPbx"] for s in sessions), default=0),
        "droppedToPipeline": sum(s["droppedToPipeline"] for s in sessions),
        "lateFramesOver5ms": sum(s["lateFrames"] for s in sessions),
        "maxLatenessMs": max((s["maxLatenessMs"] for s in sessions), default=0),
    }


async def spawn(*args: str) -> tuple[asyncio.subprocess.Process, int]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, *args, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    return process, int(line)


async def one_run(
    calls: int,
    seconds: float,
    dialect: str,
    profile: Path | None = None,
    pbx: str = "asterisk",
    *,
    record: bool = False,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sipbridge-bench-") as directory:
        state = Path(directory)
        pipeline, pipeline_port = await spawn("pipeline", "--state", directory)
        bridge, audiosocket_port = await spawn(
            "bridge",
            "--state", directory,
            "--pipeline-url", f"ws://127.0.0.1:{pipeline_port}/pipeline",
            "--dialect", dialect,
            "--pbx", pbx,
            *(["--profile"] if profile else []),
            *(["--record"] if record else []),
        )  # fmt: skip
        simulator = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "pbx",
            "--state", directory,
            "--port", str(audiosocket_port),
            "--calls", str(calls),
            "--seconds", str(seconds),
            "--pbx", pbx,
        )  # fmt: skip
        await simulator.wait()
        for process in (bridge, pipeline):
            process.send_signal(signal.SIGTERM)
            await process.wait()
        result = analyse(state, calls, seconds)
        result["dialect"] = dialect
        result["pbx"] = pbx
        result["recorded"] = record
        if record:
            recorded = list((state / "recordings").glob("*.stereo.wav"))
            result["recordedCalls"] = len(recorded)
            result["recordedBytesPerCallSecond"] = round(
                sum(path.stat().st_size for path in recorded) / (calls * seconds)
            )
        if profile is not None:
            shutil.copyfile(state / "bridge.prof", profile)
        return result


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| PBX leg | dialect | recorded | calls | jitter p50/p99/max ms "
        "| clear→silence p50/p99/max ms "
        "| frames after clear (max) | caller→pipeline p50/p99 ms | CPU % of a core "
        "| simulators' CPU % | dropped | late >5 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        j, c, lat = r["pacingJitterToPbxMs"], r["clearToSilenceMs"], r["callerToPipelineLatencyMs"]
        lines.append(
            f"| {LEG_NAMES[r.get('pbx', 'asterisk')]} | {r['dialect']} "
            f"| {'yes' if r.get('recorded') else 'no'} | {r['calls']} "
            f"| {j['p50']}/{j['p99']}/{j['max']} "
            f"| {c['p50']}/{c['p99']}/{c['max']} | {r['replyFramesAfterClear']['max']} "
            f"| {lat.get('p50', '–')}/{lat.get('p99', '–')} | {r['bridgeCpuPercentOfOneCore']} "
            f"| {r['pbxSimulatorCpuPercent'] + r['pipelineSimulatorCpuPercent']:.0f} "
            f"| {r['droppedToPbx'] + r['droppedToPipeline']} | {r['lateFramesOver5ms']} |"
        )
    return "\n".join(lines)


async def orchestrate(
    calls: list[int],
    seconds: float,
    dialects: list[str],
    profile: Path | None,
    pbxes: Sequence[str] = ("asterisk",),
    *,
    records: Sequence[bool] = (False,),
) -> dict[str, Any]:
    results = []
    for pbx in pbxes:
        for dialect in dialects:
            for count in calls:
                for record in records:
                    print(
                        f"running {count} calls, {pbx}, {dialect}, {seconds:g} s"
                        f"{', recorded' if record else ''}…",
                        file=sys.stderr,
                    )
                    results.append(
                        await one_run(count, seconds, dialect, profile, pbx, record=record)
                    )
    document = {
        "benchmark": "media_path",
        "sipbridge": __version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "command": "benchmarks/media_path.py " + " ".join(sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": results,
    }
    return document


def write_results(document: dict[str, Any], out: Path) -> None:
    results = document["results"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        f"# media_path\n\n`{document['command']}` on {document['machine']}, "
        f"Python {document['python']}, {document['when']}\n\n{table(results)}\n"
    )
    print(table(results))
    print(f"\nwritten: {out} and {out.with_suffix('.md')}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    roles = parser.add_subparsers(dest="role")
    for role in ("bridge", "pbx", "pipeline"):
        sub = roles.add_parser(role)
        sub.add_argument("--state", type=Path, required=True)
        sub.add_argument("--pipeline-url", default="")
        sub.add_argument("--dialect", default="raw")
        sub.add_argument("--port", type=int, default=0)
        sub.add_argument("--calls", type=int, default=1)
        sub.add_argument("--seconds", type=float, default=10)
        sub.add_argument("--profile", action="store_true")
        sub.add_argument("--pbx", default="asterisk", choices=sorted(LEG_NAMES))
        sub.add_argument("--record", action="store_true")
    parser.add_argument("--calls", type=int, nargs="+", default=[1, 50, 100])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument(
        "--dialect", nargs="+", default=["raw", "twilio"], choices=sorted(PIPELINE_RATES)
    )
    parser.add_argument(
        "--pbx", nargs="+", default=["asterisk", "freeswitch"], choices=sorted(LEG_NAMES)
    )
    parser.add_argument(
        "--record",
        nargs="+",
        default=["no"],
        choices=["no", "yes"],
        help="run without and/or with every call recorded (stereo + mono WAV)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "media_path.json")
    parser.add_argument("--profile", type=Path, help="write cProfile stats of sipbridge here")
    args = parser.parse_args()
    if args.role == "bridge" and args.profile:
        # Where sipbridge's CPU goes (cProfile slows Python calls: read the shares, not times).
        cProfile.runctx(
            "asyncio.run(run_bridge(args.pipeline_url, args.dialect, args.state, args.pbx,"
            " args.record))",
            globals(),
            {"args": args},
            str(args.state / "bridge.prof"),
        )
    elif args.role == "bridge":
        asyncio.run(run_bridge(args.pipeline_url, args.dialect, args.state, args.pbx, args.record))
    elif args.role == "pbx":
        asyncio.run(run_pbx(args.port, args.calls, args.seconds, args.state, args.pbx))
    elif args.role == "pipeline":
        asyncio.run(run_pipeline(args.state))
    else:
        document = asyncio.run(
            orchestrate(
                args.calls,
                args.seconds,
                args.dialect,
                args.profile,
                args.pbx,
                records=[choice == "yes" for choice in args.record],
            )
        )
        write_results(document, args.out)


if __name__ == "__main__":
    main()
