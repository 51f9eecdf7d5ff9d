"""The Asterisk backend: AMI control and AudioSocket media, as one :class:`PbxBackend`.

Calls reach sipbridge through the project's dialplan (``dialplan/sipbridge.conf``): the offer
context raises a ``UserEvent`` with the INVITE's facts and rings; the backend reports it
(:class:`CallOffered`) and carries out the flow's decision with AMI actions (``PJSIPHangup``
with a SIP status, a ``Redirect`` to the media or transfer context, ``Hangup``). An accepted
call's audio arrives on the backend's AudioSocket server, tagged with sipbridge's call id
(:class:`LegConnected`). The AMI session itself is :mod:`bridge.pbx.asterisk.link`.

A watchdog sends the heartbeat ``Setvar`` every ``ping_interval_s`` (the dialplan refuses calls
while it is stale) and drops the link when one is not answered within the interval and nothing
else came from Asterisk meanwhile either (a half-open connection is noticed within two
intervals), then reconnects with backoff. Asterisk answers one session's actions in order, so
under load a heartbeat queued behind twenty calls' actions may wait longer than an interval on
a link that is plainly alive: that is logged, not a reason to drop the calls' actions.

An action whose answer is lost with the link has an unknown outcome. For ``connect_media`` that
matters: Asterisk may have answered the caller and started AudioSocket. So once AMI is back,
the channel's place decides (:func:`ami.redirect_outcome`): in the media context the leg is on
its way; still in the offer context the actions are sent again; gone is an error.

After each (re)connect the live calls are resynchronised with ``CoreShowChannels``: calls that
ended meanwhile are ended, calls that waited in the offer context unseen are announced again,
and AudioSocket channels nobody owns are hung up. A channel is announced to the call flow at
most once: one whose call was already decided (a reject or hangup that could not be sent while
AMI was down) gets that decision carried out now, never a second call record. Calls already in
AudioSocket keep their audio while AMI is down (the media path does not use AMI).

The reconnect backoff doubles from 0.5 s up to ``reconnect_max_delay_s`` and starts again from
0.5 s only after a link that stayed up for a ping interval (at least ``STABLE_LINK_MIN_S``): an
Asterisk that accepts logins and then drops them is not hammered every 0.5 s.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bridge.errors import (
    LocalProtocolError,
    PbxActionError,
    PbxAuthError,
    PbxConnectionError,
    PbxError,
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
from bridge.pbx.asterisk.audiosocket import AudioSocketLeg, AudioSocketServer
from bridge.pbx.asterisk.link import AmiLink
from bridge.protocol import ami
from bridge.settings import AsteriskSettings, MediaSettings
from bridge.tasks import cancel_and_wait

log = logging.getLogger(__name__)

OFFER_CONTEXT = "sipbridge-offer"
FIRST_RETRY_DELAY_S = 0.5
# A link must stay up this long (or one ping interval, if longer) to reset the backoff.
STABLE_LINK_MIN_S = 2.0
# What the dialplan itself answers when nobody decides in time (sipbridge.conf, after Wait()).
UNDECIDED_SIP_STATUS = 480
# A hangup of an outbound call whose channel Asterisk has not created yet is tried again.
OUTBOUND_HANGUP_RETRY_S = 3.0
OUTBOUND_HANGUP_RETRY_INTERVAL_S = 0.1
# Responses that mean "the channel is already gone": the goal of a hangup is reached.
_GONE = ("no such channel", "channel does not exist", "channel not found")


def _is_gone(exc: PbxActionError) -> bool:
    return any(marker in str(exc).lower() for marker in _GONE)


@dataclass
class _Announced:
    """A channel announced to the call flow, and the final action decided for it (if any)."""

    channel: str
    final: ami.Action | None = None


class AsteriskBackend:
    """AMI events in, call-flow events out; the flow's decisions out as AMI actions; the
    calls' audio over AudioSocket (``PbxBackend``)."""

    kind: PbxKind = "asterisk"

    def __init__(
        self,
        settings: AsteriskSettings,
        media: MediaSettings,
        *,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.media = media
        self._events: CallEvents | None = None
        self._wall_clock = wall_clock
        self._clock = clock
        self._sleep = sleep
        self.link = AmiLink(settings, self._on_event)
        self.audiosocket = AudioSocketServer(
            media.audiosocket_host, media.audiosocket_port, media.max_frame_bytes, self._on_leg
        )
        self._supervisor: asyncio.Task[None] | None = None
        # A session that was opened and reported up, and when: the supervisor watches it next.
        self._session_since: float | None = None
        # Channels announced to the flow, by Uniqueid, until Asterisk says they are gone: a
        # channel is never announced twice, and a final action that could not be sent is
        # carried out by the next resync.
        self._announced: dict[str, _Announced] = {}
        self._filters_refused = False
        # Outbound dials that ended unanswered, by call id, until the call's Hangup says so.
        self._dial_results: dict[str, ami.DialResult] = {}
        # Outbound calls originated whose first half has not hung up yet.
        self._dialing: set[str] = set()

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self, events: CallEvents) -> None:
        """Opens the AudioSocket server, connects (a refused login is an error at once), then
        supervises the link.

        Raises:
            PbxAuthError: wrong username or secret.
            OSError: the AudioSocket port cannot be bound.
        """
        self._events = events
        await self.audiosocket.start()
        try:
            await self.link.open()
        except PbxConnectionError as exc:
            log.warning("%s; retrying in the background", exc)
        else:
            await self._connected()
        self._supervisor = asyncio.create_task(self._supervise(), name="ami-supervisor")

    def describe(self) -> dict[str, Any]:
        """The AudioSocket server for ``/health``."""
        return {"audiosocket": self.audiosocket_address(), "legs": len(self.audiosocket)}

    def audiosocket_address(self) -> str:
        """The host:port Asterisk connects AudioSocket to."""
        if self.media.audiosocket_advertise:
            return self.media.audiosocket_advertise
        host = self.media.audiosocket_host
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard bind is not an address to dial
            host = "127.0.0.1"
        return f"{host}:{self.audiosocket.port}"

    def _post(self, event: CallOffered | CallGone | LegConnected | LinkChanged) -> None:
        if self._events is not None:
            self._events.post(event)

    def _on_leg(self, call_id: str, leg: AudioSocketLeg) -> None:
        self._post(LegConnected(call_id, leg))

    @property
    def stable_after_s(self) -> float:
        """How long a link must stay up before the reconnect backoff starts again from 0.5 s."""
        return max(self.settings.ping_interval_s, STABLE_LINK_MIN_S)

    async def aclose(self) -> None:
        """Stops supervising, closes the link, then the AudioSocket server."""
        if self._supervisor is not None:
            await cancel_and_wait([self._supervisor])
            self._supervisor = None
        await self.link.aclose()
        await self.audiosocket.aclose()

    async def _supervise(self) -> None:
        delay = FIRST_RETRY_DELAY_S
        while True:
            try:
                delay = await self._supervise_once(delay)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Task boundary: whatever went wrong, keep supervising the link.
                log.exception("AMI supervisor step failed")
                self.link.drop()
                delay = self.settings.reconnect_max_delay_s

    async def _supervise_once(self, delay: float) -> float:
        """One round: watch the live session until it drops, then try to reconnect once.

        Returns the delay before the next try if this one fails or its link drops quickly.
        """
        since, self._session_since = self._session_since, None
        if since is not None:
            await self._watch()
            self._post(LinkChanged(self.kind, False, "AMI link lost"))
            up_s = self._clock() - since
            log.error(
                "AMI link to %s:%s lost after %.1f s; reconnecting",
                self.settings.host,
                self.settings.port,
                up_s,
            )
            if up_s >= self.stable_after_s:
                delay = FIRST_RETRY_DELAY_S
        # Jitter keeps many sipbridges from reconnecting to one Asterisk in lockstep.
        await self._sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - not security
        next_delay = min(delay * 2, self.settings.reconnect_max_delay_s)
        try:
            await self.link.open()
        except PbxAuthError as exc:
            log.error("%s (check asterisk.username/asterisk.secret)", exc)
            return self.settings.reconnect_max_delay_s
        except PbxConnectionError as exc:
            log.warning("%s; next try in %.1f s", exc, next_delay)
            return next_delay
        await self._connected()
        # Not reset yet: only a link that stays up a while earns the short delay again.
        return next_delay

    async def _connected(self) -> None:
        log.info(
            "AMI link up (%s:%s, session %d)",
            self.settings.host,
            self.settings.port,
            self.link.connects,
        )
        self._session_since = self._clock()
        self._post(LinkChanged(self.kind, True, "AMI link up"))
        try:
            await self._filter_events()
            await self.link.action(ami.heartbeat(int(self._wall_clock())))
            await self.resync()
        except PbxError as exc:
            log.error("after connecting: %s", exc)

    async def _filter_events(self) -> None:
        """Asks Asterisk for the events sipbridge uses and no others, where the user may."""
        try:
            for action in ami.event_filters():
                await self.link.action(action)
        except PbxActionError as exc:
            # The least-privileged user (dialplan/manager.conf.sample) has no "system" write
            # and filters in manager.conf instead; only say so once per process.
            if not self._filters_refused:
                self._filters_refused = True
                log.info(
                    "AMI event filters not set (%s); the user's eventfilter and the login's "
                    "event classes (%s) limit what Asterisk sends",
                    exc,
                    ami.EVENT_CLASSES,
                )

    async def _watch(self) -> None:
        """Heartbeats until the link drops; a heartbeat not answered in time drops it."""
        interval = self.settings.ping_interval_s
        lost = asyncio.ensure_future(self.link.wait_lost())
        try:
            while True:
                done, _ = await asyncio.wait({lost}, timeout=interval)
                if done:
                    return
                heard = self.link.received_bytes
                try:
                    await self.link.action(ami.heartbeat(int(self._wall_clock())), limit_s=interval)
                except PbxConnectionError:
                    return
                except PbxActionError as exc:
                    if self.link.received_bytes > heard:
                        # Answers and events still arrive: Asterisk is busy, the link is alive.
                        log.warning("AMI heartbeat: %s, but Asterisk is sending; keeping it", exc)
                        continue
                    log.error("AMI heartbeat failed (%s); dropping the link", exc)
                    self.link.drop()
                    await lost
                    return
        finally:
            lost.cancel()

    async def _channels(self) -> list[ami.ChannelState]:
        """The channels Asterisk has now."""
        rows = await self.link.list_action({"Action": "CoreShowChannels"})
        return [state for state in map(ami.channel_state, rows) if state is not None]

    async def resync(self) -> None:
        """Reconciles the live calls with the channels Asterisk has now."""
        states = await self._channels()
        present = {state.uniqueid for state in states}
        for uniqueid in [u for u in self._announced if u not in present]:
            del self._announced[uniqueid]  # gone while AMI was away; its Hangup was missed
        known = self._events.live_calls(self.kind) if self._events is not None else set()
        for uniqueid in sorted(known - present):
            log.info("call %s ended while AMI was away", uniqueid)
            self._post(self._gone(uniqueid))
        for state in states:
            if state.uniqueid in known:
                continue
            announced = self._announced.get(state.uniqueid)
            if announced is not None:
                await self._settle_again(state, announced)
            elif state.context == OFFER_CONTEXT:
                # Any step of the offer context, not only Wait(): a channel caught between its
                # UserEvent and Wait() would otherwise ring unseen until the dialplan's 480.
                # The redirect restarts it at s,1, so it announces itself exactly once more.
                log.info("announcing again %s, which waited while AMI was away", state.channel)
                await self._attempt(ami.redirect(state.channel, OFFER_CONTEXT))
            elif state.context == self.settings.media_context:
                log.warning("hanging up %s: its AudioSocket belongs to no live call", state.channel)
                await self._attempt(ami.hangup(state.channel))

    async def _settle_again(self, state: ami.ChannelState, announced: _Announced) -> None:
        """A channel whose call has ended in the flow is still there: finish it, once."""
        if announced.final is not None:
            action = {**announced.final, "Channel": state.channel}
            log.warning(
                "%s outlived its call: sending the %s that AMI missed",
                state.channel,
                action["Action"],
            )
        else:
            # Announced, ended in the flow, never told to the PBX (should not happen): what the
            # dialplan would do if nobody answered, rather than a second call record.
            action = (
                ami.reject(state.channel, UNDECIDED_SIP_STATUS)
                if state.context == OFFER_CONTEXT
                else ami.hangup(state.channel)
            )
            log.warning("%s outlived its call: ending it", state.channel)
        announced.final = action
        try:
            await self.link.action(action)
        except PbxActionError as exc:
            if _is_gone(exc) or action["Action"] == "Hangup":
                log.warning("%s", exc)
                return
            # PJSIPHangup refuses a channel that is no longer ringing: a plain hangup ends it.
            log.warning("%s; hanging up instead", exc)
            await self._attempt(ami.hangup(state.channel))

    async def _attempt(self, action: Mapping[str, str]) -> None:
        try:
            await self.link.action(action)
        except PbxActionError as exc:
            log.warning("%s", exc)

    # ---- events -------------------------------------------------------------------------------

    def _on_event(self, event: Mapping[str, Any]) -> None:
        name = event.get("Event")
        if name == "UserEvent" and event.get("UserEvent") == ami.OFFER_EVENT:
            offer = ami.decode_offer(event)
            if offer.truncated:
                log.warning(
                    "call %s: X- headers beyond 3000 encoded bytes were left out by the dialplan",
                    offer.facts.pbx_call_id,
                )
            facts = offer.facts
            if facts.pbx_call_id in self._announced:
                # Announced again by a resync racing the first announcement, or after its call
                # ended: one channel is one call record.
                log.info("%s was announced before; not offering it again", facts.channel)
                return
            self._post(CallOffered(facts))
            self._announced[facts.pbx_call_id] = _Announced(facts.channel)
        elif name == "UserEvent" and event.get("UserEvent") == ami.OUTBOUND_EVENT:
            result = ami.decode_dial_result(event)
            if result is not None and result.status != "ANSWER":
                # The first half's Hangup follows (AMI keeps a session's events in order).
                self._dial_results[result.call_id] = result
        elif name == "Hangup":
            uniqueid = str(event.get("Uniqueid", ""))
            if uniqueid:
                self._announced.pop(uniqueid, None)
                self._post(self._gone(uniqueid, ami.hangup_cause(event)))

    def _gone(self, uniqueid: str, cause: int = 0) -> CallGone:
        """A channel is gone: with how its dial ended, if it was an outbound call's."""
        self._dialing.discard(uniqueid)
        dialed = self._dial_results.pop(uniqueid, None)
        if dialed is None:
            return CallGone(self.kind, uniqueid, cause=cause)
        return CallGone(
            self.kind,
            uniqueid,
            cause=cause,
            dial_status=dialed.status,
            sip_status=dialed.sip_status,
            detail=dialed.detail,
        )

    # ---- PbxControl -----------------------------------------------------------------------------

    async def reject(self, facts: InviteFacts, sip_status: int) -> None:
        """``PJSIPHangup`` with the exact SIP status (the call was never answered)."""
        await self._final(facts, ami.reject(facts.channel, sip_status))

    async def connect_media(self, facts: InviteFacts, call_id: str) -> None:
        """Answer and run AudioSocket toward our server, tagged with the call id.

        If the link drops on the way, this waits for it to come back and finishes the job
        (the caller's own time limit bounds the wait): the call flow would otherwise end a
        call whose caller Asterisk has answered, and refuse the audio that then arrives.

        Raises:
            PbxActionError: Asterisk refused an action, or the channel ended or moved elsewhere
                while AMI was down.
        """
        media_context = self.settings.media_context
        actions = ami.connect_media(
            facts.channel, call_id, self.audiosocket_address(), media_context
        )
        while True:
            try:
                for action in actions:
                    await self.link.action(action)
                return
            except PbxConnectionError as exc:
                log.warning("connecting %s: %s; checking it once AMI is back", facts.channel, exc)
            state = await self._channel_once_up(facts.pbx_call_id)
            announced = self._announced.get(facts.pbx_call_id)
            if announced is not None and announced.final is not None:
                raise PbxActionError(f"{facts.channel} was ended while AMI was down")
            outcome = ami.redirect_outcome(state, waiting=OFFER_CONTEXT, target=media_context)
            if outcome is ami.Redirected.DONE:
                log.info("%s reached %s while AMI was down", facts.channel, media_context)
                return
            if outcome is not ami.Redirected.NOT_DONE:
                where = f" (in {state.context})" if state is not None else ""
                raise PbxActionError(f"{facts.channel} is {outcome}{where}")
            log.info("%s is still waiting in %s: connecting it again", facts.channel, OFFER_CONTEXT)

    async def _channel_once_up(self, uniqueid: str) -> ami.ChannelState | None:
        """The channel as Asterisk has it, asked on the next AMI session that stays up."""
        while True:
            await self.link.wait_up()
            try:
                states = await self._channels()
            except PbxConnectionError:
                continue  # dropped again before answering: wait for the next session
            return next((state for state in states if state.uniqueid == uniqueid), None)

    async def transfer(self, facts: InviteFacts, destination: Mapping[str, Any]) -> None:
        """Blind transfer: Asterisk dials the destination from the transfer context."""
        try:
            plan = ami.transfer(
                facts.channel,
                destination,
                endpoint=self.settings.transfer_endpoint,
                transfer_context=self.settings.transfer_context,
            )
        except LocalProtocolError as exc:  # e.g. sipHeaders too long for one AMI line
            raise PbxActionError(f"transfer of {facts.channel}: {exc}") from None
        for note in plan.notes:
            log.warning("transfer of %s: %s", facts.pbx_call_id, note)
        for action in plan.actions:
            await self.link.action(action)

    def check_dial(self, dial: OutboundDial) -> str | None:
        """Why Asterisk could not dial this (a URI Dial() cannot take, headers too long for
        one AMI line), or None."""
        try:
            self._originate_action("00000000-0000-0000-0000-000000000000", dial)
        except (PbxActionError, LocalProtocolError) as exc:
            return str(exc)
        return None

    def _originate_action(self, call_id: str, dial: OutboundDial) -> ami.MultiAction:
        target = ami.dial_target(dial.customer, self.settings.outbound_endpoint, "customer")
        customer = dial.customer.get("number") or ami.uri_user(dial.customer.get("sipUri"))
        return ami.originate(
            call_id,
            target=target,
            caller_id=dial.caller_id,
            caller_name=dial.caller_name,
            headers=dict(dial.headers),
            ring_timeout_s=dial.ring_timeout_s,
            audiosocket=self.audiosocket_address(),
            outbound_context=self.settings.outbound_context,
            media_context=self.settings.media_context,
            customer_id=customer or "",
        )

    async def originate(self, facts: InviteFacts, call_id: str, dial: OutboundDial) -> None:
        """``Originate`` (asynchronous) through the outbound context; the call's first half
        has the call id as its Uniqueid, which ``facts`` names it by from now on. Returns once
        Asterisk has queued the dial (its channel exists a moment later).

        Raises:
            PbxActionError: the customer cannot be dialled safely, or Asterisk refused.
        """
        try:
            action = self._originate_action(call_id, dial)
        except LocalProtocolError as exc:
            raise PbxActionError(str(exc)) from None
        # Known before Asterisk answers: a resync meanwhile must not take it for a stray, and
        # a hangup before its channel exists must wait for it (see hangup).
        self._announced[facts.pbx_call_id] = _Announced(facts.channel)
        self._dialing.add(facts.pbx_call_id)
        try:
            await self.link.action(action)
        except PbxError:
            self._announced.pop(facts.pbx_call_id, None)
            self._dialing.discard(facts.pbx_call_id)
            raise

    async def hangup(self, facts: InviteFacts) -> None:
        """Hang up; a channel that is already gone counts as done. An outbound call's first
        half may not exist yet (Asterisk creates it just after queueing the Originate): it is
        asked for again, for OUTBOUND_HANGUP_RETRY_S at most, until it exists or is gone."""
        deadline = self._clock() + OUTBOUND_HANGUP_RETRY_S
        while True:
            try:
                await self._final(facts, ami.hangup(facts.channel))
                return
            except PbxActionError as exc:
                if not _is_gone(exc):
                    raise
                if facts.pbx_call_id not in self._dialing or self._clock() >= deadline:
                    return
            await self._sleep(OUTBOUND_HANGUP_RETRY_INTERVAL_S)

    async def _final(self, facts: InviteFacts, action: ami.Action) -> None:
        """Sends the action that ends a call, remembered first: if it fails (AMI down, no
        answer), the next resync carries it out instead of announcing the channel again."""
        announced = self._announced.setdefault(facts.pbx_call_id, _Announced(facts.channel))
        announced.final = action
        try:
            await self.link.action(action)
        except PbxActionError as exc:
            if _is_gone(exc):
                self._announced.pop(facts.pbx_call_id, None)
            raise

    async def send_dtmf(self, facts: InviteFacts, digits: str) -> None:
        """Play DTMF to the caller (``PlayDTMF``, one action per digit)."""
        for digit in digits:
            if digit in "wW":
                await asyncio.sleep(0.5)
                continue
            await self.link.action(
                ami.checked(
                    {
                        "Action": "PlayDTMF",
                        "Channel": facts.channel,
                        "Digit": digit,
                        "Duration": "250",
                    }
                )
            )
