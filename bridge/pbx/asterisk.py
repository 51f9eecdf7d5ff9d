"""The Asterisk adapter: panoramisk's AMI session behind a supervisor that fixes its defects.

What panoramisk 1.4 does and what this module does instead (libraries.md section 2):

- It decodes each TCP chunk with ``errors='ignore'``, dropping a UTF-8 character split across
  reads: :class:`_Utf8Protocol` decodes incrementally first.
- It never raises on a bad secret and retries it forever: :meth:`AmiLink.start` raises
  :class:`PbxAuthError` on the first refused login; later refusals are logged as errors.
- Its pings are fire-and-forget, so a half-open connection is never noticed: a watchdog sends
  the heartbeat ``Setvar`` every ``ping_interval_s`` and drops the link when one is not answered
  within the interval (noticed within two intervals), then reconnects with backoff.
- It re-sends unanswered actions after reconnecting: here every pending action fails at once
  with :class:`PbxConnectionError` when the link drops, and nothing is queued for later; no
  Redirect or Hangup is ever sent twice.
- Its actions have no timeout: every action here has one.

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
import codecs
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from panoramisk import Manager
from panoramisk.ami_protocol import AMIProtocol

from bridge.errors import PbxActionError, PbxAuthError, PbxConnectionError, PbxError
from bridge.events import InviteFacts, PbxKind
from bridge.protocol import ami
from bridge.settings import AsteriskSettings
from bridge.tasks import cancel_and_wait

log = logging.getLogger(__name__)

OFFER_CONTEXT = "sipbridge-offer"
CONNECT_TIMEOUT_S = 5.0
FIRST_RETRY_DELAY_S = 0.5
# A link must stay up this long (or one ping interval, if longer) to reset the backoff.
STABLE_LINK_MIN_S = 2.0
# What the dialplan itself answers when nobody decides in time (sipbridge.conf, after Wait()).
UNDECIDED_SIP_STATUS = 480
# Responses that mean "the channel is already gone": the goal of a hangup is reached.
_GONE = ("no such channel", "channel does not exist", "channel not found")


def _is_gone(exc: PbxActionError) -> bool:
    return any(marker in str(exc).lower() for marker in _GONE)


@dataclass
class _Announced:
    """A channel announced to the call flow, and the final action decided for it (if any)."""

    channel: str
    final: ami.Action | None = None


class _Utf8Protocol(AMIProtocol):  # type: ignore[misc]
    """panoramisk's protocol, fed only whole UTF-8 characters ('José Müller' survives)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def data_received(self, data: bytes) -> None:
        super().data_received(self._utf8.decode(data).encode("utf-8"))


class _Manager(Manager):  # type: ignore[misc]
    """panoramisk's Manager without its own reconnects, pings or action replays."""

    def __init__(self, on_lost: Callable[[BaseException | None], None], **config: Any) -> None:
        super().__init__(**config)
        self._on_lost = on_lost

    def connection_made(self, future: asyncio.Future[Any]) -> None:
        # On failure panoramisk schedules its own reconnect; the supervisor does that here.
        if future.cancelled() or future.exception() is not None:
            return
        super().connection_made(future)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._connected = False
        pinger = getattr(self, "pinger", None)
        if pinger is not None:
            pinger.cancel()
            self.pinger = None
        self._on_lost(exc)

    async def send_awaiting_actions(self, *_: Any) -> None:
        # panoramisk would re-send actions that were pending when the link dropped.
        self.awaiting_actions.clear()


class EventSink(Protocol):
    """Where the adapter reports calls (the call flow, through the composition root)."""

    def offered(self, facts: InviteFacts, truncated: bool) -> None:
        """A call waits for a decision."""

    def hung_up(self, pbx_call_id: str, cause: int) -> None:
        """A channel is gone."""

    def link_changed(self, up: bool, detail: str) -> None:
        """The AMI link went up or down."""

    def known_calls(self) -> set[str]:
        """Unique ids of the calls the flow still considers live."""


class AmiLink:
    """One supervised AMI session: connect, log in, watch, reconnect."""

    def __init__(
        self, settings: AsteriskSettings, on_event: Callable[[Mapping[str, Any]], None]
    ) -> None:
        self.settings = settings
        self._on_event = on_event
        self._manager: _Manager | None = None
        self._lost: asyncio.Event = asyncio.Event()
        self._closing = False
        # Our own record of unanswered actions: panoramisk forgets some when the link drops.
        self._pending: set[asyncio.Future[Any]] = set()
        self.up = False
        self.connects = 0

    # ---- connection -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Connects and logs in once.

        Raises:
            PbxConnectionError: Asterisk cannot be reached (retryable).
            PbxAuthError: Asterisk refused the username or secret.
        """
        settings = self.settings
        secret = settings.secret.get_secret_value() if settings.secret else ""
        lost = asyncio.Event()
        manager = _Manager(
            lambda exc: self._connection_lost(manager, lost, exc),
            host=settings.host,
            port=settings.port,
            username=settings.username,
            secret=secret,
            events="on",
            encoding="utf8",
            protocol_factory=_Utf8Protocol,
            loop=asyncio.get_running_loop(),
            # Never: the adapter pings with a timeout and reconnects itself.
            ping_delay=10**9,
            ping_interval=10**9,
            reconnect_timeout=10**9,
        )
        manager.register_event("*", self._dispatch)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await manager.connect()
        except (OSError, TimeoutError) as exc:
            manager.close()
            raise PbxConnectionError(
                f"cannot reach AMI at {settings.host}:{settings.port}: {exc or 'timeout'}"
            ) from exc
        # panoramisk sends Login from the connect task's done-callback, registered before our
        # await, so it has run by now.
        if manager.authenticated_future is None:
            manager.close()
            raise PbxConnectionError("AMI login was not sent")
        # Wait for the login answer or the connection's end, whichever comes first: a peer that
        # accepts and drops (a proxy, a restarting Asterisk) must not cost the full timeout.
        answer = asyncio.ensure_future(asyncio.shield(manager.authenticated_future))
        closed = asyncio.ensure_future(lost.wait())
        try:
            done, _ = await asyncio.wait(
                {answer, closed}, timeout=CONNECT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            closed.cancel()
            if not answer.done():
                answer.cancel()
        if answer not in done or answer.exception() is not None:
            manager.close()
            raise PbxConnectionError("the AMI connection closed before the login was answered")
        response = answer.result()
        if not response.success:
            manager.close()
            raise PbxAuthError(
                f"Asterisk refused AMI login as {settings.username!r}: {response.message}"
            )
        if lost.is_set():
            # Answered and closed in one read: the session is dead before it is ours.
            manager.close()
            raise PbxConnectionError("the AMI connection closed right after the login")
        self._manager, self._lost = manager, lost
        self.up = True
        self.connects += 1

    def _connection_lost(
        self, manager: _Manager, lost: asyncio.Event, exc: BaseException | None
    ) -> None:
        # Fail every action still waiting: none of them will be answered, none is re-sent.
        manager.awaiting_actions.clear()
        if manager is self._manager:
            for future in list(self._pending):
                if not future.done():
                    future.set_exception(PbxConnectionError("the AMI link dropped"))
            self._pending.clear()
            self.up = False
        lost.set()

    def _dispatch(self, _manager: Manager, message: Mapping[str, Any]) -> None:
        try:
            self._on_event(message)
        except Exception:
            # Task boundary for events: one bad event must not stop the others.
            log.exception("handling AMI event %s failed", message.get("Event"))

    async def wait_lost(self) -> None:
        """Returns when the current session is gone."""
        await self._lost.wait()

    def drop(self) -> None:
        """Aborts the current session (the supervisor reconnects)."""
        manager = self._manager
        transport = getattr(getattr(manager, "protocol", None), "transport", None)
        if transport is not None:
            transport.abort()

    async def aclose(self) -> None:
        """Logs off (best effort) and closes."""
        self._closing = True
        manager = self._manager
        if manager is not None and self.up:
            with contextlib.suppress(PbxError):
                await self.action({"Action": "Logoff"}, limit_s=1.0)
        if manager is not None:
            manager.close()
        self.up = False

    # ---- actions ------------------------------------------------------------------------------

    async def action(self, fields: Mapping[str, str], limit_s: float | None = None) -> Any:
        """Sends one action and returns its response.

        Raises:
            PbxConnectionError: the link is down (nothing was sent) or dropped meanwhile.
            PbxActionError: Asterisk answered with an error, or not within the timeout.
        """
        manager = self._manager
        if manager is None or not self.up:
            raise PbxConnectionError("the AMI link is down")
        checked = ami.checked(fields)
        limit = limit_s or self.settings.action_timeout_s
        # as_list=False: otherwise panoramisk guesses from the response text, and PlayDTMF's
        # "DTMF successfully queued" makes it look up an Async field that is not there: a
        # KeyError inside data_received that drops the whole AMI link.
        future = manager.send_action(dict(checked), as_list=False)
        response = await self._await(future, checked["Action"], limit)
        if isinstance(response, list):
            return response
        if getattr(response, "response", "") in ("Error", "Fail", "Failure"):
            raise PbxActionError(f"{checked['Action']}: {response.message or 'failed'}")
        return response

    async def list_action(self, fields: Mapping[str, str]) -> list[Any]:
        """Sends an action whose answer is a list of events (``CoreShowChannels``)."""
        manager = self._manager
        if manager is None or not self.up:
            raise PbxConnectionError("the AMI link is down")
        future = manager.send_action(dict(ami.checked(fields)), as_list=True)
        result = await self._await(future, fields["Action"], self.settings.action_timeout_s)
        return list(result) if isinstance(result, list) else [result]

    async def _await(self, future: asyncio.Future[Any], name: str, limit_s: float) -> Any:
        self._pending.add(future)
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the future completes, and the task would never stop.
            async with asyncio.timeout(limit_s):
                return await asyncio.shield(future)
        except TimeoutError:
            raise PbxActionError(f"{name} got no answer within {limit_s:g} s") from None
        finally:
            self._pending.discard(future)


class AsteriskAdapter:
    """Turns AMI events into call-flow events and carries out its decisions (``PbxControl``)."""

    kind: PbxKind = "asterisk"

    def __init__(
        self,
        settings: AsteriskSettings,
        sink: EventSink,
        *,
        audiosocket_address: Callable[[], str],
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self._sink = sink
        self._audiosocket_address = audiosocket_address
        self._wall_clock = wall_clock
        self._clock = clock
        self._sleep = sleep
        self.link = AmiLink(settings, self._on_event)
        self._supervisor: asyncio.Task[None] | None = None
        # A session that was opened and reported up, and when: the supervisor watches it next.
        self._session_since: float | None = None
        # Channels announced to the flow, by Uniqueid, until Asterisk says they are gone: a
        # channel is never announced twice, and a final action that could not be sent is
        # carried out by the next resync.
        self._announced: dict[str, _Announced] = {}

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connects (a refused login is an error at once), then supervises the link.

        Raises:
            PbxAuthError: wrong username or secret.
        """
        try:
            await self.link.open()
        except PbxConnectionError as exc:
            log.warning("%s; retrying in the background", exc)
        else:
            await self._connected()
        self._supervisor = asyncio.create_task(self._supervise(), name="ami-supervisor")

    @property
    def stable_after_s(self) -> float:
        """How long a link must stay up before the reconnect backoff starts again from 0.5 s."""
        return max(self.settings.ping_interval_s, STABLE_LINK_MIN_S)

    async def aclose(self) -> None:
        """Stops supervising and closes the link."""
        if self._supervisor is not None:
            await cancel_and_wait([self._supervisor])
            self._supervisor = None
        await self.link.aclose()

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
            self._sink.link_changed(False, "AMI link lost")
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
        self._sink.link_changed(True, "AMI link up")
        try:
            await self.link.action(ami.heartbeat(int(self._wall_clock())))
            await self.resync()
        except PbxError as exc:
            log.error("after connecting: %s", exc)

    async def _watch(self) -> None:
        """Heartbeats until the link drops; a heartbeat not answered in time drops it."""
        interval = self.settings.ping_interval_s
        lost = asyncio.ensure_future(self.link.wait_lost())
        try:
            while True:
                done, _ = await asyncio.wait({lost}, timeout=interval)
                if done:
                    return
                try:
                    await self.link.action(ami.heartbeat(int(self._wall_clock())), limit_s=interval)
                except PbxConnectionError:
                    return
                except PbxActionError as exc:
                    log.error("AMI heartbeat failed (%s); dropping the link", exc)
                    self.link.drop()
                    await lost
                    return
        finally:
            lost.cancel()

    async def resync(self) -> None:
        """Reconciles the live calls with the channels Asterisk has now."""
        rows = await self.link.list_action({"Action": "CoreShowChannels"})
        states = [state for state in map(ami.channel_state, rows) if state is not None]
        present = {state.uniqueid for state in states}
        for uniqueid in [u for u in self._announced if u not in present]:
            del self._announced[uniqueid]  # gone while AMI was away; its Hangup was missed
        known = self._sink.known_calls()
        for uniqueid in sorted(known - present):
            log.info("call %s ended while AMI was away", uniqueid)
            self._sink.hung_up(uniqueid, 0)
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
            self._sink.offered(facts, offer.truncated)
            self._announced[facts.pbx_call_id] = _Announced(facts.channel)
        elif name == "Hangup":
            uniqueid = str(event.get("Uniqueid", ""))
            if uniqueid:
                self._announced.pop(uniqueid, None)
                self._sink.hung_up(uniqueid, ami.hangup_cause(event))

    # ---- PbxControl -----------------------------------------------------------------------------

    async def reject(self, facts: InviteFacts, sip_status: int) -> None:
        """``PJSIPHangup`` with the exact SIP status (the call was never answered)."""
        await self._final(facts, ami.reject(facts.channel, sip_status))

    async def connect_media(self, facts: InviteFacts, call_id: str) -> None:
        """Answer and run AudioSocket toward our server, tagged with the call id."""
        for action in ami.connect_media(
            facts.channel, call_id, self._audiosocket_address(), self.settings.media_context
        ):
            await self.link.action(action)

    async def transfer(self, facts: InviteFacts, destination: Mapping[str, Any]) -> None:
        """Blind transfer: Asterisk dials the destination from the transfer context."""
        plan = ami.transfer(
            facts.channel,
            destination,
            endpoint=self.settings.transfer_endpoint,
            transfer_context=self.settings.transfer_context,
        )
        for note in plan.notes:
            log.warning("transfer of %s: %s", facts.pbx_call_id, note)
        for action in plan.actions:
            await self.link.action(action)

    async def hangup(self, facts: InviteFacts) -> None:
        """Hang up; a channel that is already gone counts as done."""
        try:
            await self._final(facts, ami.hangup(facts.channel))
        except PbxActionError as exc:
            if not _is_gone(exc):
                raise

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
