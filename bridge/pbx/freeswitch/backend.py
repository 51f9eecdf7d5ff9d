"""The FreeSWITCH backend: Event Socket control and unicast L16 media, as one :class:`PbxBackend`.

Calls reach sipbridge through ``freeswitch_conf/sipbridge.xml``: the offer extension marks the
call, rings and parks it; the backend sees the ``CHANNEL_PARK`` (:class:`CallOffered`) and
carries out the flow's decision over the Event Socket (``respond`` then ``hangup``, or
``answer`` then ``unicast``, or a transfer through ``freeswitch_conf/sipbridge_context.xml``).
An accepted call's audio arrives on a UDP socket of its own (:mod:`bridge.pbx.freeswitch.unicast`,
:class:`LegConnected`); FreeSWITCH reports the caller's keys as ``DTMF`` events, which join the
call's leg. The connection is :mod:`bridge.pbx.freeswitch.link`.

An asyncio watchdog sets the global ``sipbridge_heartbeat`` variable every ``ping_interval_s``
(the dialplan refuses calls while it is stale) and drops a link that does not answer in time
(a half-open connection is noticed within two intervals).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Mapping
from typing import Any

from bridge.errors import (
    LocalProtocolError,
    PbxActionError,
    PbxConnectionError,
    PbxError,
    RemoteProtocolError,
)
from bridge.events import (
    CallEvents,
    CallGone,
    CallOffered,
    InviteFacts,
    LegConnected,
    LinkChanged,
    OutboundDial,
    PbxKind,
)
from bridge.pbx.freeswitch.link import EslLink
from bridge.pbx.freeswitch.ports import UnicastPorts
from bridge.pbx.freeswitch.unicast import UnicastLeg, UnicastMedia
from bridge.protocol import esl
from bridge.settings import FreeswitchSettings, MediaSettings
from bridge.tasks import TaskSet, cancel_and_wait

log = logging.getLogger(__name__)

# The events the backend needs, nothing else (ALL is ~80 messages per call).
# JSON, not plain: plain events url-encode values, and FreeSWITCH 1.10.12 decodes an X- header
# that already holds %XX once too often (X-Pct: 100%41off arrived as 100Aoff).
SUBSCRIPTION = "event json CHANNEL_PARK CHANNEL_BRIDGE CHANNEL_HANGUP_COMPLETE DTMF"
# Set by every watchdog ping; freeswitch_conf/sipbridge.xml checks that it is fresh.
HEARTBEAT_VARIABLE = "sipbridge_heartbeat"
HEARTBEAT_COMMAND = f"api expand global_setvar {HEARTBEAT_VARIABLE}=${{strepoch()}}"

# FreeSWITCH hangup causes for the SIP statuses sipbridge refuses calls with (mod_sofia maps
# them back: 404 UNALLOCATED_NUMBER, 480 NO_USER_RESPONSE..., 603 CALL_REJECTED).
_CAUSE_FOR_STATUS = {
    404: "UNALLOCATED_NUMBER",
    480: "NO_ANSWER",
    486: "USER_BUSY",
    603: "CALL_REJECTED",
}
# user@host[:port][;params]: no ":_:" (FreeSWITCH's enterprise-originate separator), no "/"
# (another endpoint), no "," "|" or spaces (more dial strings).
_SIP_TARGET = re.compile(
    r"^sips?:[A-Za-z0-9._~+!*'%=-]{1,128}@[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?(;[A-Za-z0-9=._-]{1,64})*$"
)
_NUMBER_TARGET = re.compile(r"^\+?[0-9*#]{1,32}$")
_SIP_HEADER_NAME = re.compile(r"^X-[A-Za-z0-9_-]{1,60}$")


def _argument(value: str) -> str:
    """A value as the last argument of an api command (switch_separate_string strips quotes and
    backslashes unless they are escaped)."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


class FreeswitchBackend:
    """Event Socket events in, call-flow events out; the flow's decisions out as Event Socket
    commands; the calls' audio over unicast UDP (``PbxBackend``).

    A call is offered when FreeSWITCH parks it with ``<offer_variable>=true`` set (see
    ``freeswitch_conf/sipbridge.xml``): ringing, X- headers in its ``sip_h_X-*`` variables.

    Args:
        settings: the ``[freeswitch]`` settings.
        media: the ``[media]`` settings (where the unicast sockets bind, the start timeout).
    """

    kind: PbxKind = "freeswitch"

    def __init__(self, settings: FreeswitchSettings, media: MediaSettings) -> None:
        self.settings = settings
        self._events: CallEvents | None = None
        self.link = EslLink(settings, SUBSCRIPTION, self._on_event, self._on_link)
        self.unicast = UnicastMedia(
            media.unicast_host,
            media.unicast_advertise,
            on_leg=self._on_leg,
            start_timeout_s=media.connect_timeout_s,
        )
        self._ports = UnicastPorts(settings.unicast_port_min, settings.unicast_port_max)
        self._announced: set[str] = set()
        self._tasks = TaskSet("freeswitch")
        self._watchdog: asyncio.Task[None] | None = None
        # Decisions that could not be carried out while the link was down, by channel: done by
        # the next resync (a refused caller must not ring on, an ended call not stay up).
        self._kills_pending: set[str] = set()
        self._refusals_pending: dict[str, int] = {}
        # Transfers waiting for their outcome (CHANNEL_BRIDGE, or a re-park saying it failed).
        self._transfers: dict[str, asyncio.Future[None]] = {}
        # Each call's unicast pair (FreeSWITCH's side, ours): restarted after a failed transfer.
        self._unicast_pairs: dict[str, tuple[tuple[str, int], tuple[str, int]]] = {}

    async def start(self, events: CallEvents) -> None:
        """Connects (a refused password is an error at once), then watches the link.

        Raises:
            PbxAuthError: wrong event socket password.
        """
        self._events = events
        await self.link.start()
        self._watchdog = asyncio.create_task(self._watch(), name="freeswitch-watchdog")

    async def aclose(self) -> None:
        """Stops the watchdog and the link, then closes every unicast socket."""
        if self._watchdog is not None:
            await cancel_and_wait([self._watchdog])
            self._watchdog = None
        await self._tasks.aclose()
        await self.link.aclose()
        await self.unicast.aclose()

    def describe(self) -> dict[str, Any]:
        """The unicast sockets for ``/health``."""
        return {"unicastLegs": len(self.unicast)}

    def _post(self, event: CallOffered | CallGone | LegConnected | LinkChanged) -> None:
        if self._events is not None:
            self._events.post(event)

    def _on_leg(self, call_id: str, leg: UnicastLeg) -> None:
        self._post(LegConnected(call_id, leg))

    async def _watch(self) -> None:
        interval = self.settings.ping_interval_s
        while True:
            await asyncio.sleep(interval)
            if not self.link.up:
                continue
            try:
                async with asyncio.timeout(interval):
                    await self._heartbeat()
            except (TimeoutError, PbxActionError):
                log.error("FreeSWITCH answered no ping in %.1f s: dropping the link", interval)
                self.link.drop()
            except PbxConnectionError:
                continue

    async def _heartbeat(self) -> None:
        # The ping is the heartbeat: freeswitch_conf's dialplan refuses calls at once (480) when
        # it is stale, instead of parking them for a sipbridge that is gone. FreeSWITCH stamps
        # it with its own clock (expand), so no clock skew between hosts matters.
        await self.link.command(esl.command(HEARTBEAT_COMMAND))

    # ---- events ---------------------------------------------------------------------------------

    def _on_link(self, up: bool, detail: str) -> None:
        self._post(LinkChanged(self.kind, up, detail))
        if up:
            self._tasks.spawn(self._connected(), "connected")
        else:
            for future in self._transfers.values():
                if not future.done():
                    future.set_exception(
                        PbxConnectionError("the event socket dropped during the transfer")
                    )

    async def _connected(self) -> None:
        """Stamps the heartbeat at once (calls arriving before the first ping would get 480),
        then reconciles what happened while the link was down."""
        try:
            await self._heartbeat()
            await self._resync()
        except PbxError as exc:
            log.warning("after connecting: %s", exc)

    async def _resync(self) -> None:
        """Carries out the decisions the link could not, ends the calls whose channels went
        away meanwhile, and offers the calls that were parked while nobody listened.

        Raises:
            PbxError: the link failed meanwhile (the next connection resyncs again).
        """
        for channel in sorted(self._kills_pending):
            log.info("hanging up %s, which could not be hung up while the link was down", channel)
            await self.hang_up_channel(channel)
        for channel, status in sorted(self._refusals_pending.items()):
            self._refusals_pending.pop(channel, None)
            if await self._exists(channel):
                log.info("refusing %s with %d, decided while the link was down", channel, status)
                await self._refuse(channel, status)
        known = self._events.live_calls(self.kind) if self._events is not None else set()
        for uniqueid in sorted(known):
            if not await self._exists(uniqueid):
                # The hangup event was missed; the call's audio stopped when the channel ended.
                log.info("call %s ended while the event socket was away", uniqueid)
                ended_at = self.unicast.last_audio_at(uniqueid)
                self._forget(uniqueid)
                self._post(CallGone(self.kind, uniqueid, ended_at=ended_at))
        await self._offer_unseen(known)

    async def _exists(self, channel: str) -> bool:
        reply = await self.link.command(esl.command(f"api uuid_exists {channel}"))
        return reply.text.strip() == "true"

    async def _offer_unseen(self, known: set[str]) -> None:
        """Offers the calls sipbridge's dialplan parked while the link was down (their
        CHANNEL_PARK was never seen); they would ring until the caller gave up."""
        reply = await self.link.command(esl.command("api show channels as json"))
        for uniqueid in esl.parked_channels(reply.text):
            if uniqueid in self._announced or uniqueid in known:
                continue
            dump = await self.link.command(esl.command(f"api uuid_dump {uniqueid} json"))
            try:
                event = esl.parse_dump(dump.text)
            except RemoteProtocolError:
                continue  # gone meanwhile ("-ERR No such channel!")
            self._offer(event, note="parked while the event socket was away")

    def _on_event(self, event: esl.EslEvent) -> None:
        name, uniqueid = event.name, event.unique_id or ""
        if name == "CHANNEL_PARK":
            transfer = self._transfers.get(uniqueid)
            if transfer is not None and event.headers.get("variable_sipbridge_transfer_failed"):
                cause = event.headers.get("variable_sipbridge_transfer_cause") or "unknown cause"
                if not transfer.done():
                    transfer.set_exception(PbxActionError(f"the transfer failed: {cause}"))
                return
            self._offer(event)
        elif name == "CHANNEL_BRIDGE":
            transfer = self._transfers.get(uniqueid)
            if transfer is not None and not transfer.done():
                transfer.set_result(None)
        elif name == "CHANNEL_HANGUP_COMPLETE" and uniqueid:
            transfer = self._transfers.get(uniqueid)
            if transfer is not None and not transfer.done():
                transfer.set_exception(PbxActionError("the channel ended during the transfer"))
            self._forget(uniqueid)
            self._post(
                CallGone(
                    self.kind,
                    uniqueid,
                    by_caller=esl.ended_by_caller(event),
                    cause=esl.hangup_cause_code(event),
                    ended_at=esl.event_time(event),
                )
            )
        elif name == "DTMF" and uniqueid:
            digit = event.headers.get("DTMF-Digit", "")
            if len(digit) == 1 and digit in "0123456789*#ABCD":
                # FreeSWITCH reports keys as events; they join the call's leg like AudioSocket's.
                self.unicast.dtmf(uniqueid, digit)

    def _offer(self, event: esl.EslEvent, note: str = "") -> None:
        """Offers a channel sipbridge's dialplan parked, once."""
        uniqueid = event.unique_id or ""
        if event.headers.get(f"variable_{self.settings.offer_variable}") != "true":
            return  # parked by another part of the dialplan, or no longer an offer
        if uniqueid in self._announced:
            return  # parked again: one channel, one call
        try:
            facts = esl.invite_facts_of(event)
        except RemoteProtocolError as exc:
            log.warning("ignored a parked call: %s", exc)
            return
        if note:
            log.info("offering %s, %s", uniqueid, note)
        self._announced.add(uniqueid)
        self._post(CallOffered(facts))

    def _forget(self, uniqueid: str) -> None:
        """The channel is gone: its leg ends as the caller's hangup, its port is free."""
        self._announced.discard(uniqueid)
        self._ports.release(uniqueid)
        self._unicast_pairs.pop(uniqueid, None)
        self.unicast.hung_up(uniqueid)

    # ---- PbxControl -----------------------------------------------------------------------------

    async def _api(self, text: str) -> esl.EslMessage:
        try:
            framed = esl.command(f"api {text}")
        except LocalProtocolError as exc:  # a caller's value with a line break in it
            raise PbxActionError(str(exc)) from None
        reply = await self.link.command(framed)
        if not reply.text.startswith("+OK"):
            raise PbxActionError(f"FreeSWITCH: {text.split(' ', 1)[0]}: {reply.text.strip()}")
        return reply

    async def _sendmsg(self, framed: bytes, what: str) -> None:
        reply = await self.link.command(framed)
        if not reply.reply_text.startswith("+OK"):
            raise PbxActionError(f"FreeSWITCH refused {what}: {reply.reply_text}")

    async def reject(self, facts: InviteFacts, sip_status: int) -> None:
        """Answers the INVITE with ``sip_status`` (``respond``), then hangs the channel up; when
        the link is down, the next resync does it (if the caller is still there)."""
        try:
            await self._refuse(facts.channel, sip_status)
        except PbxConnectionError:
            self._refusals_pending[facts.channel] = sip_status
            raise

    async def _refuse(self, channel: str, sip_status: int) -> None:
        cause = _CAUSE_FOR_STATUS.get(sip_status, "CALL_REJECTED")
        try:
            await self._sendmsg(esl.execute(channel, "respond", str(sip_status)), "respond")
        finally:
            # Even when respond failed: a caller must not ring on for nobody.
            with contextlib.suppress(PbxActionError):
                await self._sendmsg(esl.hangup(channel, cause), "hangup")

    async def connect_media(self, facts: InviteFacts, call_id: str) -> None:
        """Answers, then has FreeSWITCH stream the call as L16 8 kHz to our UDP leg.

        Both are ``sendmsg`` messages, so the parked channel's own thread runs them, in order:
        ``answer`` first, then ``unicast``. Answering from outside that thread
        (``api uuid_answer``) aborts FreeSWITCH 1.10.12 when unicast follows within 20 ms: its
        park loop (``switch_ivr_park`` in ``src/switch_ivr.c``) decides whether to read audio
        only at the top of each 20 ms turn, so a channel answered in the middle of a turn that
        began without media reaches the unicast code with no frame read, and
        ``switch_assert(read_frame)`` fails (every call on the PBX drops). Answered in-thread,
        the next turn starts with media and reads a frame before unicast is started.

        FreeSWITCH sends from the address and port it binds (``local-ip``/``local-port``), so
        the leg accepts audio from exactly there.
        """
        freeswitch = (self.settings.unicast_host, self._ports.take(facts.pbx_call_id))
        ours = await self.unicast.open(call_id, facts.channel, freeswitch)
        self._unicast_pairs[facts.pbx_call_id] = (freeswitch, ours)
        await self._sendmsg(esl.execute(facts.channel, "answer"), "answer")
        await self._sendmsg(esl.unicast(facts.channel, freeswitch, ours), "unicast")

    async def transfer(self, facts: InviteFacts, destination: Mapping[str, Any]) -> None:
        """Blind transfer through ``freeswitch_conf``'s ``sipbridge_transfer`` extension; returns
        once it worked.

        A SIP URI is bridged from there: the transfer worked when FreeSWITCH reports the bridge
        (``CHANNEL_BRIDGE``); when the bridge fails, the dialplan parks the channel again with
        ``sipbridge_transfer_failed`` set, and the call's audio is reconnected so that the
        conversation goes on. A number goes to the ``default`` context, whose outcome
        sipbridge cannot see: it is done once FreeSWITCH accepted the transfer.

        Raises:
            PbxActionError: the destination cannot be dialled safely, or the transfer failed.
        """
        target = str(destination.get("sipUri") or destination.get("number") or "")
        if not (_SIP_TARGET.match(target) or _NUMBER_TARGET.match(target)):
            raise PbxActionError(f"cannot transfer to {target[:80]!r}")
        headers = {str(k): str(v) for k, v in (destination.get("sipHeaders") or {}).items()}
        for name, value in headers.items():
            if not _SIP_HEADER_NAME.match(name):
                raise PbxActionError(f"cannot send SIP header {name[:60]!r}")
            if any(c in value for c in "\r\n\x00"):
                raise PbxActionError(f"SIP header {name} has a line break in its value")
        channel = facts.channel
        # FreeSWITCH copies a channel's sip_h_X-* variables into the INVITE it sends out, and
        # the caller's own X- headers are such variables: only the destination's go, as with
        # Asterisk.
        asked = {name.lower() for name in headers}
        for name, _ in facts.headers:
            if name.lower() not in asked and _SIP_HEADER_NAME.match(name):
                await self._api(f"uuid_setvar {channel} sip_h_{name}")
        for name, value in headers.items():
            await self._api(f"uuid_setvar {channel} sip_h_{name} {_argument(value)}")
        await self._api(f"uuid_setvar {channel} sipbridge_transfer_target {target}")
        # Not an offer any more, should the transfer's dialplan park it again; and no outcome
        # of an earlier transfer.
        await self._api(f"uuid_setvar {channel} {self.settings.offer_variable}")
        await self._api(f"uuid_setvar {channel} sipbridge_transfer_failed")
        outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        watched = bool(_SIP_TARGET.match(target))
        if watched:
            self._transfers[facts.pbx_call_id] = outcome
        try:
            await self._api(
                f"uuid_transfer {channel} sipbridge_transfer XML {self.settings.transfer_context}"
            )
            if watched:
                try:
                    await outcome
                except PbxActionError:
                    await self._resume_audio(facts)  # parked again: the conversation goes on
                    raise
        finally:
            self._transfers.pop(facts.pbx_call_id, None)
        # The channel now belongs to the transfer: its unicast pair ended with the park.
        self._ports.release(facts.pbx_call_id)
        self._unicast_pairs.pop(facts.pbx_call_id, None)

    async def _resume_audio(self, facts: InviteFacts) -> None:
        """After a failed transfer the channel is parked again, without its unicast (the park
        ended it): the same pair starts again, so the conversation's leg hears the caller."""
        pair = self._unicast_pairs.get(facts.pbx_call_id)
        if pair is None:
            return  # the call had no audio yet (a transfer decided while it rang)
        try:
            await self._sendmsg(esl.unicast(facts.channel, *pair), "unicast")
        except PbxError as exc:
            log.warning("could not reconnect %s's audio after the transfer: %s", facts.channel, exc)

    def check_dial(self, dial: OutboundDial) -> str | None:
        """Every dial: outbound calls through FreeSWITCH are not built yet."""
        return "outbound calls through FreeSWITCH are not supported yet"

    async def originate(self, facts: InviteFacts, call_id: str, dial: OutboundDial) -> None:
        """Outbound calls through FreeSWITCH are not built yet (no capture of ``originate``
        to test them against): refused, so ``POST /call`` says so."""
        raise PbxActionError("outbound calls through FreeSWITCH are not supported yet")

    async def hangup(self, facts: InviteFacts) -> None:
        """Hangs up; a channel that is already gone counts as done."""
        await self.hang_up_channel(facts.channel)

    async def hang_up_channel(self, channel: str) -> None:
        """``uuid_kill``; a channel that is already gone counts as done.

        Raises:
            PbxError: FreeSWITCH could not be told (link down, no answer, refused).
        """
        try:
            await self._api(f"uuid_kill {channel}")
        except PbxConnectionError:
            # Carried out by the next resync: a channel must not stay answered in silence.
            self._kills_pending.add(channel)
            raise
        except PbxActionError as exc:
            if "no such channel" not in str(exc).lower():
                raise
        self._kills_pending.discard(channel)

    async def send_dtmf(self, facts: InviteFacts, digits: str) -> None:
        """Plays DTMF to the caller (``uuid_send_dtmf``)."""
        if not re.fullmatch(r"[0-9*#A-Dw]{1,32}", digits):
            raise PbxActionError(f"cannot send DTMF {digits[:40]!r}")
        await self._api(f"uuid_send_dtmf {facts.channel} {digits}")
