from __future__ import annotations

import contextlib
import shutil
import socket
from pathlib import Path

import pytest

from bridge.lab import sipp
from bridge.lab.sipp import (
    CallPlan,
    SippCallee,
    SippCaller,
    callee_scenario,
    could_not_bind,
    free_port,
    parse_trace,
    scenario,
)

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize(
    ("trace", "expected"),
    [
        # Real SIPp traces from calls through Asterisk 22 (tests/asterisk).
        ("sipp_caller_hangs_up.messages.log", (200, False, True)),
        ("sipp_far_end_hangs_up.messages.log", (200, True, False)),
        ("sipp_rejected_404.messages.log", (404, False, False)),
    ],
)
def test_trace_parsing(trace: str, expected: tuple[int, bool, bool]) -> None:
    assert parse_trace((DATA / trace).read_text()) == expected


def test_scenario_carries_the_plan() -> None:
    plan = CallPlan(
        user="demo",
        headers=[("X-First_Name", "John"), ("X-Note", "hello, world")],
        display_name="Ann",
        tone_file=Path("/tmp/tone.ulaw"),
        silent_ms=1000,
        talk_ms=2000,
        listen_ms=500,
        dtmf="5#",
    )
    xml = scenario(plan)
    assert "X-First_Name: John\nX-Note: hello, world\nContent-Type: application/sdp" in xml
    assert '"Ann" <sip:+15551230000@' in xml
    assert 'rtp_stream="/tmp/tone.ulaw,-1,0"' in xml
    assert 'timeout="1000" ontimeout="talk"' in xml and 'timeout="2000" ontimeout="listen"' in xml
    assert xml.count("Signal=") == 2 and "Signal=#" in xml
    assert '<recv response="404" optional="true" next="rejected"/>' in xml
    assert "m=audio [media_port] RTP/AVP 0\n" in xml and "telephone-event" not in xml


def test_a_caller_can_offer_telephone_events() -> None:
    xml = scenario(CallPlan(user="demo", telephone_event=True))
    assert "m=audio [media_port] RTP/AVP 0 101\n" in xml
    assert "a=rtpmap:101 telephone-event/8000\na=fmtp:101 0-16\n" in xml


@pytest.mark.parametrize("value", ["a[b]c", "line\r\nInjected: 1"])
def test_scenario_refuses_what_sipp_would_misread(value: str) -> None:
    with pytest.raises(ValueError, match="cannot go into a SIPp scenario"):
        scenario(CallPlan(user="demo", headers=[("X-Bad", value)]))


def test_callee_checks_headers_and_references_its_variables() -> None:
    xml = callee_scenario({"X-Account": "gold, vip"})
    assert 'regexp="X\\-Account: gold,\\ vip"' in xml
    assert 'check_it="true"' in xml and '<Reference variables="h0"/>' in xml
    assert "<Reference" not in callee_scenario({})


def test_a_callee_that_hangs_up_sends_the_bye_of_its_own_dialog() -> None:
    xml = callee_scenario({"X-Account": "gold"}, hangs_up=True)
    answered = xml.index('<recv request="ACK"/>')
    bye = xml.index("BYE [next_url] SIP/2.0")
    assert answered < bye and '<recv request="BYE"/>' not in xml
    # From is the INVITE's To with the tag of the 200 OK, To the INVITE's From.
    assert 'header="From:" assign_to="peer"' in xml and 'header="To:" assign_to="own"' in xml
    assert "From:[$own];tag=[pid]SIPpTag01[call_number]\nTo:[$peer]\n" in xml
    assert 'check_it="true"' in xml  # headers are still checked
    waits = callee_scenario({})
    assert '<recv request="BYE"/>' in waits and "BYE [next_url]" not in waits


def test_free_ports() -> None:
    port = free_port(socket.SOCK_STREAM)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))
    rtp = free_port(pair=True)
    assert rtp % 4 == 0
    with contextlib.ExitStack() as held:  # SIPp binds audio and video RTP/RTCP from -mp
        for offset in range(4):
            sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            sock.bind(("127.0.0.1", rtp + offset))


def test_media_ports_for_callers_started_together_never_overlap() -> None:
    """Twenty callers' -mp ports chosen before any SIPp binds them: one caller's video port was
    another's audio port ("Unable to bind video RTP socket", the call never placed)."""
    firsts = [free_port(pair=True) for _ in range(200)]
    singles = [free_port() for _ in range(400)]  # their SIP and control ports
    ports = [first + offset for first in firsts for offset in range(4)] + singles
    assert len(set(ports)) == len(ports)


def test_a_caller_whose_port_was_taken_since_the_probe_is_placed_again() -> None:
    """Seen in CI: another process took the probed control port before SIPp bound it ("Unable to
    bind remote control socket … errno = 98"), and the call was never placed."""
    errors = "Unable to bind remote control socket to UDP port 52422, errno = 98 (Address already in use)"
    assert could_not_bind(255, "", errors)
    assert not could_not_bind(0, "", errors)
    assert not could_not_bind(255, "----- sent\nINVITE sip:demo@127.0.0.1:5060 SIP/2.0", errors)
    assert not could_not_bind(1, "", "Aborting call on unexpected message")


@pytest.mark.skipif(shutil.which("sipp") is None, reason="needs sipp (apt-get install sip-tester)")
async def test_a_real_caller_retries_when_its_control_port_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    single_ports: list[int] = []

    def probe(kind: int = socket.SOCK_DGRAM, pair: bool = False) -> int:
        port = free_port(kind, pair)
        if not pair:
            single_ports.append(port)
            if len(single_ports) == 2:  # the first attempt's -cp
                return int(taken.getsockname()[1])
        return port

    callee = SippCallee(tmp_path / "callee", free_port())
    await callee.start(timeout_s=30)
    monkeypatch.setattr(sipp, "free_port", probe)
    try:
        result = await SippCaller(f"127.0.0.1:{callee.port}", tmp_path / "caller").call(
            CallPlan(user="target", talk_ms=0, listen_ms=200), name="retry"
        )
        code, _ = await callee.wait()
    finally:
        taken.close()
        await callee.stop()
    assert result.answered and result.bye_from_caller and result.returncode == 0, result.trace
    assert code == 0
    assert len(single_ports) == 4  # two attempts, each a SIP port and a control port
    assert "could not bind a port" in caplog.text
