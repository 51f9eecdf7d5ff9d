"""Both pipeline dialects end to end through real Asterisk 22 and SIPp ([pipeline] issue).

The pipeline is a real websockets server in this process; what the caller hears is the RTP
Asterisk sends to SIPp's media port, captured on loopback and checked by content: each 20 ms
packet is classified by the tone that holds most of its energy. Pipeline scripts look at the
capture while the call runs to check *when* in the audio something happened (a mark, a clear),
counted in frames, not in seconds.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from typing import Any

import pytest

from bridge.audio import pcm_to_ulaw, sine, tone_share, ulaw_to_pcm
from bridge.lab.rtp import RtpCapture
from bridge.lab.sipp import CallPlan, SippCallee, free_port
from tests.asterisk_harness import AsteriskLab, share_of_windows
from tests.pipeline_server import PipelineSession

pytestmark = [pytest.mark.asterisk, pytest.mark.integration]

TWILIO = {"pipeline": {"format": "twilio"}}
# How long a caller waits for the far end to hang up: a bound for a broken call, never a wait.
LONG_MS = 30_000


class ToneCounter:
    """Counts the packets the caller has received so far that carry one tone.

    Incremental: the pipeline scripts ask after every packet, and sipbridge's own paced writer
    runs in the same event loop.
    """

    def __init__(self, frequency: float) -> None:
        self.frequency = frequency
        self.seen = 0
        self.count = 0

    def __call__(self, capture: RtpCapture | None) -> int:
        assert capture is not None
        packets = capture.packets
        for packet in packets[self.seen :]:
            if (
                packet.payload_type == 0
                and tone_share(ulaw_to_pcm(packet.payload), 8000, self.frequency) > 0.5
            ):
                self.count += 1
        self.seen = len(packets)
        return self.count


def tone_packets(capture: RtpCapture | None, frequency: float) -> int:
    """Packets of a finished call's capture that carry ``frequency``."""
    return ToneCounter(frequency)(capture)


@dataclass(frozen=True)
class PipelineWire:
    """A pipeline of one dialect: how it sends audio and control, and reads what it gets.

    ``raw`` runs at its default 16 kHz (so sipbridge resamples both ways); ``twilio`` is
    μ-law 8 kHz in JSON, sent the way Pipecat's TwilioFrameSerializer writes it.
    """

    name: str

    @property
    def assistant(self) -> dict[str, Any]:
        return {"sipbridge": {"pipeline": {"format": self.name}}}

    @property
    def rate(self) -> int:
        return 8000 if self.name == "twilio" else 16000

    def _stream_sid(self, session: PipelineSession) -> str:
        return str(session.start["streamSid"]) if session.start else ""

    async def reply(self, session: PipelineSession, pcm: bytes, chunk_ms: int = 95) -> None:
        """A TTS reply (PCM at ``rate``) as fast as it is made, in ~95 ms chunks."""
        size = self.rate * chunk_ms // 1000 * 2
        for offset in range(0, len(pcm), size):
            chunk = pcm[offset : offset + size]
            if self.name == "twilio":
                payload = base64.b64encode(pcm_to_ulaw(chunk)).decode()
                await session.send_json(
                    {
                        "event": "media",
                        "streamSid": self._stream_sid(session),
                        "media": {"payload": payload},
                    }
                )
            else:
                await session.send(chunk)

    async def mark(self, session: PipelineSession, name: str) -> None:
        if self.name == "twilio":
            await session.send_json(
                {"event": "mark", "streamSid": self._stream_sid(session), "mark": {"name": name}}
            )
        else:
            await session.send_json({"type": "mark", "name": name})

    async def clear(self, session: PipelineSession) -> None:
        if self.name == "twilio":
            await session.send_json({"event": "clear", "streamSid": self._stream_sid(session)})
        else:
            await session.send_json({"type": "clear"})

    def marks(self, session: PipelineSession) -> list[str]:
        """The marks sipbridge has echoed, in order."""
        if self.name == "twilio":
            return [m["mark"]["name"] for m in session.controls if m.get("event") == "mark"]
        return [m["name"] for m in session.controls if m.get("type") == "mark"]

    def digits(self, session: PipelineSession) -> str:
        """The caller's keys as sipbridge reported them."""
        if self.name == "twilio":
            return "".join(m["dtmf"]["digit"] for m in session.controls if m.get("event") == "dtmf")
        return "".join(m["digit"] for m in session.controls if m.get("type") == "dtmf")

    def caller_pcm(self, session: PipelineSession) -> bytes:
        """What the pipeline heard of the caller, as PCM at ``rate``."""
        audio = bytes(session.audio)
        return ulaw_to_pcm(audio) if self.name == "twilio" else audio

    def stop_reason(self, session: PipelineSession) -> str:
        if self.name == "twilio":
            stop = next(m for m in session.controls if m.get("event") == "stop")
            assert stop["streamSid"] == self._stream_sid(session)
            return str(stop["stop"]["reason"])
        return str(next(m for m in session.controls if m.get("type") == "stop")["reason"])


@pytest.fixture(params=["raw", "twilio"])
def wire(request: pytest.FixtureRequest) -> PipelineWire:
    return PipelineWire(request.param)


async def wait_mark(wire: PipelineWire, session: PipelineSession, name: str) -> None:
    await session.wait_for(lambda s: name in wire.marks(s), 15.0)


async def test_tone_in_and_tone_out_at_the_right_pace(
    asterisk_lab: AsteriskLab, wire: PipelineWire
) -> None:
    lab = asterisk_lab

    async def script(session: PipelineSession) -> None:
        await wire.reply(session, sine(1200, 3.0, wire.rate))  # 3 s of reply, in a burst

    lab.pipeline.script = script
    await lab.serve_assistant(**wire.assistant)
    result, rtp = await lab.call(
        CallPlan(
            user="demo",
            headers=[("X-First_Name", "John")],
            tone_file=lab.tone_file(700),
            talk_ms=4000,
            listen_ms=1000,
        ),
        capture=True,
    )
    assert result.answered and result.bye_from_caller

    session = await lab.pipeline.session()
    start = session.start
    assert start is not None
    if wire.name == "twilio":
        assert start["event"] == "start"
        assert start["start"]["mediaFormat"] == {
            "encoding": "audio/x-mulaw",
            "sampleRate": 8000,
            "channels": 1,
        }
        parameters = start["start"]["customParameters"]
        assert parameters["first_name"] == "John" and parameters["X-First_Name"] == "John"
        assert parameters["firstMessage"] == "Hello John, you've reached me over SIP."
    else:
        assert start["audioFormat"]["sampleRate"] == 16000
        assert start["assistant"]["firstMessage"] == "Hello John, you've reached me over SIP."
    await session.closed.wait()
    # The caller's 700 Hz tone, as the pipeline received it.
    fraction, count = share_of_windows(wire.caller_pcm(session), wire.rate, 700)
    assert count >= 3 and fraction >= 0.95, (fraction, count)
    assert wire.stop_reason(session) == "customer-ended-call"

    # The 3 s reply reached the caller whole, as 20 ms packets spread over 3 s of real time
    # (a burst passed through unpaced would arrive within a few milliseconds).
    assert rtp is not None
    heard = [
        p
        for p in rtp.packets
        if p.payload_type == 0 and tone_share(ulaw_to_pcm(p.payload), 8000, 1200) > 0.5
    ]
    assert 147 <= len(heard) <= 151, len(heard)
    assert {len(p.payload) for p in heard} == {160}
    assert heard[-1].arrival - heard[0].arrival >= 2.9
    report = await lab.sink.wait_for_message("end-of-call-report")
    media = report.message["call"]["sipbridge"]["media"]
    assert media["droppedToCaller"] == 0 and media["droppedToPipeline"] == 0
    assert await lab.no_channels_left() == []


async def test_clear_silences_the_caller_and_returns_pending_marks(
    asterisk_lab: AsteriskLab, wire: PipelineWire
) -> None:
    lab = asterisk_lab
    counts: dict[str, int] = {}
    reply_heard = ToneCounter(1200)

    async def script(session: PipelineSession) -> None:
        await wire.reply(session, sine(1200, 6.0, wire.rate))
        await wire.mark(session, "reply-1")
        assert lab.listening is not None
        await asyncio.wait_for(
            lab.listening.wait_until(lambda capture: reply_heard(capture) >= 50), 15
        )
        await wire.clear(session)
        await wait_mark(wire, session, "reply-1")  # a cleared mark comes back at once
        counts["at_mark"] = reply_heard(lab.listening)

    lab.pipeline.script = script
    await lab.serve_assistant(**wire.assistant)
    result, rtp = await lab.call(CallPlan(user="demo", talk_ms=500, listen_ms=4000), capture=True)
    assert result.answered
    # The caller heard about one second of the six queued, and nothing after the clear but
    # what was already on its way through Asterisk.
    total = tone_packets(rtp, 1200)
    assert 50 <= total <= 60, total
    assert total - counts["at_mark"] <= 2, (total, counts)
    assert await lab.no_channels_left() == []


async def test_marks_come_back_in_order_only_after_their_audio(
    asterisk_lab: AsteriskLab, wire: PipelineWire
) -> None:
    lab = asterisk_lab
    seen: dict[str, tuple[int, int]] = {}
    first_heard, second_heard = ToneCounter(500), ToneCounter(1500)

    async def script(session: PipelineSession) -> None:
        await wire.reply(session, sine(500, 1.0, wire.rate))
        await wire.mark(session, "first")
        await wire.reply(session, sine(1500, 1.0, wire.rate))
        await wire.mark(session, "second")
        for name in ("first", "second"):
            await wait_mark(wire, session, name)
            seen[name] = (first_heard(lab.listening), second_heard(lab.listening))

    lab.pipeline.script = script
    await lab.serve_assistant(**wire.assistant)
    result, _ = await lab.call(CallPlan(user="demo", talk_ms=500, listen_ms=3500), capture=True)
    assert result.answered
    assert wire.marks(await lab.pipeline.session()) == ["first", "second"]
    # When "first" came back the caller had heard (nearly) all of the first part: the mark is
    # never early. How soon after that it reaches the pipeline is latency, which a busy machine
    # stretches (the echo queues behind the caller's media in the same event loop) and
    # benchmarks/media_path.py measures; here it must only come back well before the second
    # part is over, which a mark held until the end of the queued audio would not.
    assert seen["first"][0] >= 47 and seen["first"][1] < 25, seen
    assert seen["second"][1] >= 47, seen


@pytest.mark.parametrize("telephone_event", [True, False], ids=["rfc4733", "inband"])
async def test_dtmf_both_ways_then_the_pipeline_says_goodbye_and_hangs_up(
    asterisk_lab: AsteriskLab, wire: PipelineWire, telephone_event: bool
) -> None:
    lab = asterisk_lab

    async def script(session: PipelineSession) -> None:
        await session.wait_for(lambda s: "5" in wire.digits(s))
        await session.send_json({"type": "send-dtmf", "digits": "7"})
        await wire.reply(session, sine(1000, 1.0, wire.rate))  # the goodbye
        await session.send_json({"type": "end-call", "reason": "assistant-ended-call"})

    lab.pipeline.script = script
    await lab.serve_assistant(**wire.assistant)
    result, rtp = await lab.call(
        CallPlan(
            user="demo", talk_ms=200, listen_ms=8000, dtmf="5", telephone_event=telephone_event
        ),
        capture=True,
    )
    assert result.answered and result.bye_from_far_end and not result.bye_from_caller
    session = await lab.pipeline.session()
    assert wire.digits(session) == "5"
    if wire.name == "twilio":
        dtmf = next(m for m in session.controls if m.get("event") == "dtmf")
        assert dtmf["dtmf"] == {"track": "inbound_track", "digit": "5"}
    assert rtp is not None
    if telephone_event:
        assert rtp.telephone_events() == "7"
    else:
        # Key 7 is 852 Hz + 1209 Hz; with no telephone-event offered Asterisk (dtmf_mode=auto)
        # plays it in band.
        assert rtp.telephone_events() == ""
        seven = [
            p
            for p in rtp.packets
            if p.payload_type == 0
            and tone_share(ulaw_to_pcm(p.payload), 8000, 852) > 0.2
            and tone_share(ulaw_to_pcm(p.payload), 8000, 1209) > 0.2
        ]
        assert len(seven) >= 5, len(seven)
    assert tone_packets(rtp, 1000) >= 48  # the goodbye was played out before the hang-up
    report = await lab.sink.wait_for_message("end-of-call-report")
    assert report.message["endedReason"] == "assistant-ended-call"
    assert await lab.no_channels_left() == []


async def test_the_pipeline_transfers_the_call_mid_conversation(asterisk_lab: AsteriskLab) -> None:
    lab = asterisk_lab
    target = SippCallee(lab.tmp / "callee", free_port())
    lab.extra.append(target)
    # The target hangs up once it has answered, and the caller stays until then: the transfer
    # never races a caller's timer, however slowly the machine gets there.
    await target.start(expect_headers={"X-Reason": "billing"}, hangs_up=True)

    async def script(session: PipelineSession) -> None:
        await session.wait_audio(4000)  # a quarter of a second of the caller
        await session.send_json(
            {
                "type": "transfer",
                "destination": {
                    "type": "sip",
                    "sipUri": target.uri,
                    "sipHeaders": {"X-Reason": "billing"},
                },
            }
        )

    lab.pipeline.script = script
    await lab.serve_assistant(sipbridge=TWILIO)
    result, _ = await lab.call(
        CallPlan(user="demo", tone_file=lab.tone_file(500), talk_ms=3000, listen_ms=LONG_MS)
    )
    # The BYE came from the target, through Asterisk: the caller was connected to it.
    assert result.answered and result.bye_from_far_end and not result.bye_from_caller
    code, trace = await target.wait()
    assert code == 0, trace[-2000:]
    report = await lab.sink.wait_for_message("end-of-call-report")
    assert report.message["endedReason"] == "assistant-forwarded-call"
    assert report.message["call"]["destination"]["sipUri"] == target.uri
    statuses = [m["status"] for m in lab.sink.messages("status-update")]
    assert statuses == ["ringing", "in-progress", "forwarding", "ended"]
    assert await lab.no_channels_left() == []


async def test_a_pipeline_dying_mid_call_sends_the_caller_to_the_fallback(
    asterisk_lab: AsteriskLab,
) -> None:
    lab = asterisk_lab
    target = SippCallee(lab.tmp / "callee", free_port())
    lab.extra.append(target)
    await target.start(hangs_up=True)  # as in the transfer test above: no race with a timer

    async def script(session: PipelineSession) -> None:
        await session.wait_audio(16000)  # half a second of the caller
        session.ws.transport.abort()  # the pipeline process dies: no close frame

    lab.pipeline.script = script
    await lab.serve_assistant({"fallbackDestination": {"type": "sip", "sipUri": target.uri}})
    result, _ = await lab.call(
        CallPlan(user="demo", tone_file=lab.tone_file(500), talk_ms=3000, listen_ms=LONG_MS)
    )
    # The call went on with the fallback, which hung up.
    assert result.answered and result.bye_from_far_end and not result.bye_from_caller
    code, trace = await target.wait()
    assert code == 0, trace[-2000:]
    report = await lab.sink.wait_for_message("end-of-call-report")
    assert report.message["endedReason"] == "pipeline-error-custom-llm-llm-failed"
    assert report.message["call"]["destination"]["sipUri"] == target.uri
    assert await lab.no_channels_left() == []
