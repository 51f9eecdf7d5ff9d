"""SIPp as the caller: one generated scenario per call, real RTP from a μ-law file.

The scenario (SIPp 3.6 XML, see the SIPp reference documentation: ``rtp_stream`` plays a raw
μ-law file as PCMU, 160 bytes every 20 ms) sends an INVITE with the given X- headers, accepts any
final answer, and when answered: stays silent for ``silent_ms`` (listening to the greeting),
streams the tone file for ``talk_ms``, listens for ``listen_ms``, optionally sends DTMF by SIP
INFO, then hangs up. A BYE from the far end at any point is answered, so a call the bridge ends
still counts as a completed scenario. The final status and who hung up are read back from
SIPp's message trace.

A transfer target (:class:`SippCallee`) answers one call, then waits for the BYE or, when
asked, hangs up itself: a test that lets the target end the call never has a transfer racing
the caller's own hang-up timer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

# The audio offer/answer: PCMU, 20 ms packets, and (where asked for) RFC 4733 telephone-events.
_SDP = """v=0
o=sipp 53655765 2353687637 IN IP[local_ip_type] [local_ip]
s=-
c=IN IP[media_ip_type] [media_ip]
t=0 0
m=audio [media_port] RTP/AVP 0
a=rtpmap:0 PCMU/8000
a=ptime:20
a=sendrecv
"""
TELEPHONE_EVENT_PT = 101


def _sdp(telephone_event: bool) -> str:
    if not telephone_event:
        return _SDP
    return _SDP.replace("RTP/AVP 0\n", f"RTP/AVP 0 {TELEPHONE_EVENT_PT}\n").replace(
        "a=ptime:20\n",
        f"a=rtpmap:{TELEPHONE_EVENT_PT} telephone-event/8000\n"
        f"a=fmtp:{TELEPHONE_EVENT_PT} 0-16\na=ptime:20\n",
    )


# Final responses a caller may get; SIPp needs each one it should accept listed.
_FINAL_ERRORS = (403, 404, 408, 480, 486, 488, 500, 501, 502, 503, 603)


# SIPp binds four UDP ports from its -mp port: audio RTP and RTCP, then video RTP and RTCP.
SIPP_MEDIA_PORTS = 4
# Tries to start a caller whose ports were taken between the probe and SIPp's bind.
BIND_ATTEMPTS = 3
# Ports handed out by this process: a probe frees its port at once and the kernel may offer it
# again, so without this two callers started together could get overlapping blocks (one's video
# port the other's audio), or one SIPp its own SIP port as its control port.
_handed_out: collections.deque[int] = collections.deque(maxlen=4096)


def free_port(kind: int = socket.SOCK_DGRAM, pair: bool = False) -> int:
    """A free loopback port never handed out before by this process; with ``pair``, the first of
    SIPp's four media ports (a multiple of four, all four free now)."""
    while True:
        with socket.socket(socket.AF_INET, kind) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if not pair:
            if port in _handed_out:
                continue
            _handed_out.append(port)
            return port
        first = port - port % SIPP_MEDIA_PORTS
        block = range(first, first + SIPP_MEDIA_PORTS)
        if first < 1024 or block[-1] > 65535 or any(p in _handed_out for p in block):
            continue
        try:
            with contextlib.ExitStack() as held:
                for candidate in block:
                    sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        _handed_out.extend(block)
        return first


@dataclass
class CallPlan:
    """What one caller does."""

    user: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    from_user: str = "+15551230000"
    display_name: str = "John Doe"
    to_host: str = "sip.example.com"
    tone_file: Path | None = None
    silent_ms: int = 0
    talk_ms: int = 3000
    listen_ms: int = 2000
    dtmf: str = ""
    ring_timeout_ms: int = 30_000
    # Offer RFC 4733 telephone-events, as most softphones do (else the PBX falls back to tones).
    telephone_event: bool = False


def _header_lines(headers: list[tuple[str, str]]) -> str:
    lines = []
    for name, value in headers:
        if any(c in name + value for c in "\r\n[]"):
            raise ValueError(f"header {name!r} cannot go into a SIPp scenario (CR, LF, [ or ])")
        lines.append(f"{name}: {value}")
    return "\n".join(lines)


def _bye_answered(user: str) -> str:
    """The 200 OK to the far end's BYE, made of the request's own headers."""
    return f"""  <send><![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:]
[last_Call-ID:]
[last_CSeq:]
Contact: <sip:{user}@[local_ip]:[local_port]>
Content-Length: 0

]]></send>"""


def _uas_response(
    status: str, contact_user: str | None = None, *, sdp: bool = False, cseq: str | None = None
) -> str:
    """A UAS's response to the last request, from that request's own headers: the dialog's
    to-tag, a Contact for ``contact_user``, our SDP with ``sdp`` (retransmitted until the
    ACK), and ``cseq`` in place of the request's CSeq (a 487 answers the INVITE after a
    CANCEL)."""
    contact = f"Contact: <sip:{contact_user}@[local_ip]:[local_port]>\n" if contact_user else ""
    body = (
        "Content-Type: application/sdp\nContent-Length: [len]\n\n" + _SDP
        if sdp
        else ("Content-Length: 0\n\n")
    )
    retrans = ' retrans="500"' if sdp else ""
    return f"""  <send{retrans}><![CDATA[
SIP/2.0 {status}
[last_Via:]
[last_From:]
[last_To:];tag=[pid]SIPpTag01[call_number]
[last_Call-ID:]
{f"CSeq: {cseq}" if cseq else "[last_CSeq:]"}
{contact}{body}]]></send>"""


def scenario(plan: CallPlan) -> str:
    """The SIPp XML scenario for ``plan``."""
    headers = _header_lines(plan.headers)
    sender = (
        f'"{plan.display_name}" <sip:{plan.from_user}@[local_ip]:[local_port]>'
        ";tag=[pid]SIPpTag00[call_number]"
    )
    header_block = headers + "\n" if headers else ""
    errors = "\n".join(
        f'  <recv response="{code}" optional="true" next="rejected"/>' for code in _FINAL_ERRORS
    )
    stream = (
        f'<nop><action><exec rtp_stream="{plan.tone_file},-1,0"/></action></nop>'
        if plan.tone_file
        else ""
    )
    # CSeq grows with every request of the dialog (RFC 3261 12.2.1.1): INFOs from 2, then the
    # BYE. FreeSWITCH answers a BYE with a lower CSeq than an INFO before it with 500.
    dtmf_steps = "".join(
        f"""
  <send retrans="500"><![CDATA[
INFO [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: {sender}
To: <sip:[service]@{plan.to_host}>[peer_tag_param]
Call-ID: [call_id]
CSeq: {2 + index} INFO
Contact: <sip:{plan.from_user}@[local_ip]:[local_port]>
Max-Forwards: 70
Content-Type: application/dtmf-relay
Content-Length: [len]

Signal={digit}
Duration=160
]]></send>
  <recv response="200" optional="true"/>
  <recv request="BYE" timeout="400" ontimeout="dtmf{index}" next="bye_in"/>
  <label id="dtmf{index}"/>"""
        for index, digit in enumerate(plan.dtmf)
    )
    return f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="sipbridge lab caller">
  <send retrans="500"><![CDATA[
INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: {sender}
To: <sip:[service]@{plan.to_host}>
Call-ID: [call_id]
CSeq: 1 INVITE
Contact: <sip:{plan.from_user}@[local_ip]:[local_port]>
Max-Forwards: 70
{header_block}Content-Type: application/sdp
Content-Length: [len]

{_sdp(plan.telephone_event)}]]></send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
{errors}
  <recv response="200" rrs="true" timeout="{plan.ring_timeout_ms}"/>
  <send><![CDATA[
ACK [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: {sender}
To: <sip:[service]@{plan.to_host}>[peer_tag_param]
Call-ID: [call_id]
CSeq: 1 ACK
Contact: <sip:{plan.from_user}@[local_ip]:[local_port]>
Max-Forwards: 70
Content-Length: 0

]]></send>
  <recv request="BYE" timeout="{max(plan.silent_ms, 1)}" ontimeout="talk" next="bye_in"/>
  <label id="talk"/>
  {stream}
  <recv request="BYE" timeout="{max(plan.talk_ms, 1)}" ontimeout="listen" next="bye_in"/>
  <label id="listen"/>
  <nop><action><exec rtp_stream="pause"/></action></nop>{dtmf_steps}
  <recv request="BYE" timeout="{max(plan.listen_ms, 1)}" ontimeout="hangup" next="bye_in"/>
  <label id="hangup"/>
  <send retrans="500"><![CDATA[
BYE [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: {sender}
To: <sip:[service]@{plan.to_host}>[peer_tag_param]
Call-ID: [call_id]
CSeq: {2 + len(plan.dtmf)} BYE
Contact: <sip:{plan.from_user}@[local_ip]:[local_port]>
Max-Forwards: 70
Content-Length: 0

]]></send>
  <recv response="200" next="done"/>
  <label id="bye_in"/>
{_bye_answered(plan.from_user)}
  <nop next="done"/>
  <label id="rejected"/>
  <send><![CDATA[
ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
[last_Via:]
From: {sender}
[last_To:]
[last_Call-ID:]
CSeq: 1 ACK
Max-Forwards: 70
Content-Length: 0

]]></send>
  <label id="done"/>
</scenario>
"""


@dataclass
class SippResult:
    """What happened to one SIPp call."""

    returncode: int
    final_status: int | None
    bye_from_far_end: bool
    bye_from_caller: bool
    trace: str
    media_port: int

    @property
    def answered(self) -> bool:
        """The call got a 200 OK."""
        return self.final_status == 200


def parse_trace(trace: str) -> tuple[int | None, bool, bool]:
    """(final status of the INVITE, BYE received, BYE sent) from SIPp's ``-trace_msg`` log."""
    final = None
    for match in re.finditer(
        r"SIP/2\.0 (\d{3}) [^\r\n]*\r?\n(?:[^\r\n]+\r?\n)*?CSeq: 1 INVITE", trace
    ):
        code = int(match.group(1))
        if code >= 200:
            final = code
    received_bye = bool(re.search(r"message received[^\n]*\n+BYE ", trace))
    sent_bye = bool(re.search(r"message sent[^\n]*\n+BYE ", trace))
    return final, received_bye, sent_bye


class SippCaller:
    """Runs one SIPp call to ``target`` (host:port)."""

    def __init__(self, target: str, workdir: Path) -> None:
        if shutil.which("sipp") is None:
            raise RuntimeError("sipp is not installed (apt-get install sip-tester)")
        self.target = target
        self.workdir = workdir

    async def call(self, plan: CallPlan, *, name: str, media_port: int | None = None) -> SippResult:
        """Places the call and waits for the scenario to finish."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        scenario_path = self.workdir / f"{name}.xml"
        trace_path = self.workdir / f"{name}.messages.log"
        scenario_path.write_text(scenario(plan))
        trace_path.unlink(missing_ok=True)
        total_ms = (
            plan.ring_timeout_ms
            + plan.silent_ms
            + plan.talk_ms
            + plan.listen_ms
            + 400 * len(plan.dtmf)
        )
        error_path = self.workdir / f"{name}.errors.log"
        for attempt in range(1, BIND_ATTEMPTS + 1):
            trace_path.unlink(missing_ok=True)
            error_path.unlink(missing_ok=True)
            rtp_port = media_port or free_port(pair=True)
            process = await asyncio.create_subprocess_exec(
                "sipp", self.target,
                "-sf", str(scenario_path),
                "-s", plan.user,
                "-i", "127.0.0.1", "-mi", "127.0.0.1",
                "-p", str(free_port()), "-mp", str(rtp_port), "-cp", str(free_port()),
                "-m", "1", "-nostdin", "-timeout", f"{total_ms // 1000 + 10}s", "-timeout_error",
                "-trace_msg", "-message_file", str(trace_path),
                "-trace_err", "-error_file", str(error_path),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                cwd=str(self.workdir),
            )  # fmt: skip
            returncode = await process.wait()
            trace = trace_path.read_text(errors="replace") if trace_path.exists() else ""
            errors = error_path.read_text(errors="replace") if error_path.exists() else ""
            if not could_not_bind(returncode, trace, errors) or attempt == BIND_ATTEMPTS:
                break
            # A probed port is free when probed, not when SIPp binds it: another process may
            # take it meanwhile. Nothing was sent, so placing the call again is safe.
            log.warning("SIPp could not bind a port (%s); placing the call again", errors.strip())
        final, received_bye, sent_bye = parse_trace(trace)
        return SippResult(returncode, final, received_bye, sent_bye, trace, rtp_port)


def could_not_bind(returncode: int, trace: str, errors: str) -> bool:
    """Whether SIPp exited before sending anything because a port it was given was taken."""
    taken = "errno = 98" in errors or "Address already in use" in errors
    return returncode != 0 and taken and "INVITE sip:" not in trace


_CALLEE_AWAITS_BYE = f"""  <recv request="BYE"/>
{_bye_answered("target")}"""
# The BYE of a UAS: its From is the INVITE's To with the tag the 200 OK gave it, its To the
# INVITE's From (both kept by _CALLEE_DIALOG), and it goes to the INVITE's Contact (rrs on the
# INVITE: [next_url]).
_CALLEE_DIALOG = (
    '\n      <ereg regexp=".*" search_in="hdr" header="From:" assign_to="peer"/>'
    '\n      <ereg regexp=".*" search_in="hdr" header="To:" assign_to="own"/>'
)
_CALLEE_HANGS_UP = """  <send retrans="500"><![CDATA[
BYE [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
[routes]
From:[$own];tag=[pid]SIPpTag01[call_number]
To:[$peer]
[last_Call-ID:]
CSeq: 1 BYE
Contact: <sip:target@[local_ip]:[local_port]>
Max-Forwards: 70
Content-Length: 0

]]></send>
  <recv response="200"/>"""


def callee_scenario(expect_headers: dict[str, str], hangs_up: bool = False) -> str:
    """A SIPp UAS that answers one call (a transfer target) and checks headers it must get.

    A missing header fails the scenario (``check_it``), so SIPp exits non-zero. With
    ``hangs_up`` the target ends the call itself once answered; otherwise it waits for a BYE.
    """
    checks = "".join(
        f'\n      <ereg regexp="{re.escape(name)}: {re.escape(value)}" search_in="msg" '
        f'check_it="true" assign_to="h{index}"/>'
        for index, (name, value) in enumerate(expect_headers.items())
    )
    if hangs_up:
        checks += _CALLEE_DIALOG
    actions = f"<action>{checks}\n    </action>" if checks else ""
    # SIPp rejects a variable that is assigned and never used; <Reference> counts as a use.
    names = ",".join(f"h{index}" for index in range(len(expect_headers)))
    reference = f'\n  <Reference variables="{names}"/>' if names else ""
    return f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="sipbridge lab callee">
  <recv request="INVITE" rrs="true">
    {actions}
  </recv>
{_uas_response("180 Ringing", "target")}
{_uas_response("200 OK", "target", sdp=True)}
  <recv request="ACK"/>
{_CALLEE_HANGS_UP if hangs_up else _CALLEE_AWAITS_BYE}{reference}
</scenario>
"""


class SippListener:
    """SIPp listening on ``port`` for one call (a UAS), its messages traced to a file."""

    role = "uas"

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.process: asyncio.subprocess.Process | None = None
        self.trace_path = workdir / f"{self.role}-{port}.messages.log"

    async def _listen(self, scenario_text: str, timeout_s: int, media_port: int) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / f"{self.role}-{self.port}.xml"
        path.write_text(scenario_text)
        self.process = await asyncio.create_subprocess_exec(
            "sipp", "-sf", str(path), "-i", "127.0.0.1", "-mi", "127.0.0.1",
            "-p", str(self.port), "-mp", str(media_port), "-cp", str(free_port()),
            "-m", "1", "-nostdin", "-timeout", f"{timeout_s}s", "-timeout_error",
            "-trace_msg", "-message_file", str(self.trace_path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            cwd=str(self.workdir),
        )  # fmt: skip

    async def wait(self) -> tuple[int, str]:
        """Waits for the call to end; (exit code, message trace)."""
        assert self.process is not None
        code = await self.process.wait()
        trace = self.trace_path.read_text(errors="replace") if self.trace_path.exists() else ""
        return code, trace

    async def stop(self) -> None:
        """Ends SIPp if it still runs."""
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


class SippCallee(SippListener):
    """A transfer target: SIPp listening on ``port`` for one call."""

    role = "callee"

    @property
    def uri(self) -> str:
        """The SIP URI to transfer to."""
        return f"sip:target@127.0.0.1:{self.port}"

    async def start(
        self,
        expect_headers: dict[str, str] | None = None,
        timeout_s: int = 60,
        *,
        hangs_up: bool = False,
    ) -> None:
        """Listens for one call; with ``hangs_up`` it ends the call itself once answered."""
        await self._listen(
            callee_scenario(expect_headers or {}, hangs_up), timeout_s, free_port(pair=True)
        )


# How an outbound call's customer (SipCustomer) takes the call.
CustomerAnswer = Literal["answer", "busy", "decline", "no-answer"]
_CUSTOMER_REFUSALS = {"busy": "486 Busy Here", "decline": "603 Decline"}


@dataclass
class CustomerPlan:
    """What the customer of an outbound call does.

    Attributes:
        answer: ``answer`` (200 OK after ``ring_ms``), ``busy`` (486), ``decline`` (603), or
            ``no-answer`` (rings until the caller gives up and CANCELs).
        ring_ms: how long the phone rings before the answer or the refusal.
        tone_file: μ-law the customer plays, looped, from the answer to the end of the call.
        hangs_up_after_ms: answered, the customer hangs up this long after answering; None:
            the customer waits for the caller's BYE.
    """

    answer: CustomerAnswer = "answer"
    ring_ms: int = 300
    tone_file: Path | None = None
    hangs_up_after_ms: int | None = None


def customer_scenario(plan: CustomerPlan) -> str:
    """A SIPp UAS for one outbound call: rings, then answers, refuses or never answers."""
    remember = (
        '<action><ereg regexp=".*" search_in="hdr" header="From:" assign_to="peer"/>'
        '<ereg regexp=".*" search_in="hdr" header="To:" assign_to="own"/>'
        '<ereg regexp="([0-9]+) INVITE" search_in="hdr" header="CSeq:" '
        'assign_to="cseqall,cseq"/></action>'
    )
    ringing = _uas_response("180 Ringing", "customer")
    if plan.answer in _CUSTOMER_REFUSALS:
        outcome = f"""  <pause milliseconds="{plan.ring_ms}"/>
{_uas_response(_CUSTOMER_REFUSALS[plan.answer])}
  <recv request="ACK"/>"""
    elif plan.answer == "no-answer":
        outcome = f"""  <recv request="CANCEL"/>
{_uas_response("200 OK")}
{_uas_response("487 Request Terminated", cseq="[$cseq] INVITE")}
  <recv request="ACK"/>"""
    else:
        stream = (
            f'\n  <nop><action><exec rtp_stream="{plan.tone_file},-1,0"/></action></nop>'
            if plan.tone_file
            else ""
        )
        if plan.hangs_up_after_ms is None:
            ending = _CALLEE_AWAITS_BYE.replace("target@", "customer@")
        else:
            ending = (
                f'  <recv request="BYE" timeout="{max(plan.hangs_up_after_ms, 1)}" '
                'ontimeout="hangup" next="bye_in"/>\n  <label id="hangup"/>\n'
                + _CALLEE_HANGS_UP.replace("target@", "customer@")
                + '\n  <nop next="done"/>\n  <label id="bye_in"/>\n'
                + _bye_answered("customer")
                + '\n  <label id="done"/>'
            )
        outcome = f"""  <pause milliseconds="{plan.ring_ms}"/>
{_uas_response("200 OK", "customer", sdp=True)}
  <recv request="ACK"/>{stream}
{ending}"""
    return f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="sipbridge lab customer">
  <recv request="INVITE" rrs="true">{remember}</recv>
{ringing}
{outcome}
  <Reference variables="peer,own,cseqall,cseq"/>
</scenario>
"""


class SipCustomer(SippListener):
    """The customer of an outbound call: SIPp listening on ``port`` for one call, doing what
    its :class:`CustomerPlan` says; ``media_port`` is where it receives RTP."""

    role = "customer"

    def __init__(self, workdir: Path, port: int) -> None:
        super().__init__(workdir, port)
        self.media_port = free_port(pair=True)

    @property
    def uri(self) -> str:
        """The customer's SIP URI (what ``POST /call`` dials)."""
        return f"sip:customer@127.0.0.1:{self.port}"

    async def start(self, plan: CustomerPlan, timeout_s: int = 90) -> None:
        """Listens for the call."""
        await self._listen(customer_scenario(plan), timeout_s, self.media_port)
