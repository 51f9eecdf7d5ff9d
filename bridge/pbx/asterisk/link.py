"""Asterisk's AMI session: panoramisk behind a link that fixes its defects.

What panoramisk 1.4 does and what this module does instead (each pinned by a test in
``tests/test_pbx_asterisk_link.py``; panoramisk's own source, ``panoramisk/manager.py`` and
``ami_protocol.py`` of release 1.4, shows the behaviour):

- It decodes each TCP chunk with ``errors='ignore'``, dropping a UTF-8 character split across
  reads: :class:`_Utf8Protocol` decodes incrementally first.
- It never raises on a bad secret and retries it forever: :meth:`AmiLink.open` raises
  :class:`PbxAuthError` on a refused login.
- Its pings are fire-and-forget, so a half-open connection is never noticed: the backend's
  watchdog pings with a timeout and drops the link (:meth:`AmiLink.drop`).
- It re-sends unanswered actions after reconnecting: here every pending action fails at once
  with :class:`PbxConnectionError` when the link drops, and nothing is queued for later; no
  Redirect or Hangup is ever sent twice.
- Its actions have no timeout: every action here has one. An answer that was read in the same
  pass of the event loop as its time limit ran out (a loop running late on a busy machine)
  still counts as answered.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from panoramisk import Manager
from panoramisk.ami_protocol import AMIProtocol

from bridge.errors import (
    LocalProtocolError,
    PbxActionError,
    PbxAuthError,
    PbxConnectionError,
    PbxError,
)
from bridge.protocol import ami
from bridge.settings import AsteriskSettings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0


class _Utf8Protocol(AMIProtocol):  # type: ignore[misc]
    """panoramisk's protocol, fed only whole UTF-8 characters ('José Müller' survives)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        # Anything Asterisk sends proves the session alive (AmiLink.received_bytes).
        self.received_bytes = 0

    def data_received(self, data: bytes) -> None:
        self.received_bytes += len(data)
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


class AmiLink:
    """One supervised AMI session: connect, log in, watch, reconnect."""

    def __init__(
        self, settings: AsteriskSettings, on_event: Callable[[Mapping[str, Any]], None]
    ) -> None:
        self.settings = settings
        self._on_event = on_event
        self._manager: _Manager | None = None
        self._lost: asyncio.Event = asyncio.Event()
        self._up = asyncio.Event()
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
            events=ami.EVENT_CLASSES,
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
        self._up.set()
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
            self._up.clear()
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

    async def wait_up(self) -> None:
        """Returns once a session is up (at once if one is)."""
        await self._up.wait()

    @property
    def received_bytes(self) -> int:
        """Bytes Asterisk has sent on the current session: answers and events alike."""
        protocol = getattr(self._manager, "protocol", None)
        return int(getattr(protocol, "received_bytes", 0))

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
        self._up.clear()

    # ---- actions ------------------------------------------------------------------------------

    async def action(
        self, fields: Mapping[str, str | list[str]], limit_s: float | None = None
    ) -> Any:
        """Sends one action and returns its response.

        Raises:
            PbxConnectionError: the link is down (nothing was sent) or dropped meanwhile.
            PbxActionError: Asterisk answered with an error, or not within the timeout.
        """
        manager = self._manager
        if manager is None or not self.up:
            raise PbxConnectionError("the AMI link is down")
        try:
            checked = ami.checked_fields(fields)
        except LocalProtocolError as exc:
            # Never sent: the action itself is impossible (a field too long for one line).
            raise PbxActionError(f"{fields.get('Action')}: {exc}") from None
        name = str(checked["Action"])
        limit = limit_s or self.settings.action_timeout_s
        # as_list=False: otherwise panoramisk guesses from the response text, and PlayDTMF's
        # "DTMF successfully queued" makes it look up an Async field that is not there: a
        # KeyError inside data_received that drops the whole AMI link.
        future = manager.send_action(dict(checked), as_list=False)
        response = await self._await(future, name, limit)
        if isinstance(response, list):
            return response
        if getattr(response, "response", "") in ("Error", "Fail", "Failure"):
            raise PbxActionError(f"{name}: {response.message or 'failed'}")
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
            if future.done() and not future.cancelled():
                # Read in the loop pass in which the limit ran out: the loop was late, not
                # Asterisk (the limit's timer and the read are handled in the same pass).
                return future.result()
            raise PbxActionError(f"{name} got no answer within {limit_s:g} s") from None
        finally:
            self._pending.discard(future)
