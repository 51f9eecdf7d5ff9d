"""The Event Socket link: one supervised inbound connection, in a thread of its own.

greenswitch runs on gevent and does not monkey-patch, so it lives in one OS thread with its own
gevent hub; the asyncio side talks to it only through the hub's thread-safe callback
(``hub.loop.run_callback_threadsafe``) and ``loop.call_soon_threadsafe`` (gevent documents both
for this use). A supervisor in that thread connects, logs in and subscribes, reconnects with
backoff when the connection ends, and reports each change; a refused password is
:class:`PbxAuthError` at start. The connection itself is :mod:`bridge.pbx.freeswitch.connection`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import gevent
from greenswitch.esl import NotConnectedError

from bridge.errors import (
    PbxActionError,
    PbxAuthError,
    PbxConnectionError,
    RemoteProtocolError,
)
from bridge.pbx.freeswitch.connection import EslConnection, EventHandler
from bridge.protocol import esl
from bridge.settings import FreeswitchSettings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
FIRST_RETRY_DELAY_S = 0.5

LinkHandler = Callable[[bool, str], None]


class EslLink:
    """The supervised Event Socket connection, run in its own thread with its own gevent hub.

    Events reach ``on_event`` and link changes ``on_link`` on the asyncio loop that called
    :meth:`start`. :meth:`command` may be awaited from that loop.
    """

    def __init__(
        self,
        settings: FreeswitchSettings,
        subscription: str,
        on_event: EventHandler,
        on_link: LinkHandler,
    ) -> None:
        self.settings = settings
        self.subscription = subscription
        self._on_event = on_event
        self._on_link = on_link
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._hub: Any = None
        self._stop_watcher: Any = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._first: asyncio.Future[None] | None = None
        self._connection: EslConnection | None = None
        self.up = False
        self.connects = 0

    # ---- asyncio side ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the thread and waits for the first connection attempt.

        Raises:
            PbxAuthError: FreeSWITCH refused the password (not retried).
        """
        self._loop = asyncio.get_running_loop()
        self._first = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name="freeswitch-esl", daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._ready.wait, 5.0)
        try:
            # The supervisor settles it within its connect timeout; the margin is for a bug.
            async with asyncio.timeout(2 * CONNECT_TIMEOUT_S):
                await self._first
        except TimeoutError:
            log.error("the FreeSWITCH event socket thread gave no first answer; retrying")
        except PbxAuthError:
            await self.aclose()
            raise
        except PbxConnectionError as exc:
            log.warning("%s; retrying in the background", exc)

    async def command(self, framed: bytes) -> esl.EslMessage:
        """Sends one framed command (:func:`esl.command`, :func:`esl.sendmsg`), returns its reply.

        Raises:
            PbxConnectionError: the link is down or dropped meanwhile.
            PbxActionError: no reply within ``action_timeout_s``.
        """
        if self._loop is None or self._hub is None or not self.up:
            raise PbxConnectionError("the FreeSWITCH event socket is not connected")
        future: asyncio.Future[esl.EslMessage] = self._loop.create_future()
        try:
            self._hub.loop.run_callback_threadsafe(
                gevent.spawn, self._send_in_thread, framed, future
            )
        except (ValueError, AttributeError):  # the thread stopped meanwhile
            raise PbxConnectionError("the FreeSWITCH event socket is closed") from None
        try:
            async with asyncio.timeout(self.settings.action_timeout_s + 1.0):
                return await future
        except TimeoutError:
            first_line = framed.split(b"\n", 1)[0].decode(errors="replace")
            raise PbxActionError(f"FreeSWITCH did not answer {first_line!r}") from None

    def drop(self) -> None:
        """Drops the current connection (the watchdog's verdict); the supervisor reconnects."""
        hub = self._hub
        if hub is not None:
            with contextlib.suppress(ValueError, AttributeError):  # stopped meanwhile
                hub.loop.run_callback_threadsafe(self._drop_in_thread)

    async def aclose(self) -> None:
        """Stops the thread (closing the connection); a second call does nothing."""
        self._stopping.set()
        watcher, self._stop_watcher = self._stop_watcher, None
        if watcher is not None:
            with contextlib.suppress(ValueError):  # the hub is already gone
                watcher.send()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
            if self._thread.is_alive():
                log.error("the FreeSWITCH event socket thread did not stop")
            self._thread = None
        self._hub = None
        self.up = False

    def _to_loop(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(callback, *args)

    def _set_link(self, up: bool, detail: str) -> None:
        self.up = up
        self._on_link(up, detail)

    def _settle_first(self, error: BaseException | None) -> None:
        first = self._first
        if first is not None and not first.done():
            if error is None:
                first.set_result(None)
            else:
                first.set_exception(error)

    # ---- gevent thread --------------------------------------------------------------------------

    def _run(self) -> None:
        self._hub = gevent.get_hub()  # a hub of this thread's own
        # A referenced watcher keeps the hub alive while the ESL greenlets come and go (without
        # it the hub raises LoopExit once they end, and the thread dies silently).
        self._stop_watcher = self._hub.loop.async_()
        self._ready.set()
        supervisor = gevent.spawn(self._supervise)
        try:
            self._hub.wait(self._stop_watcher)
        finally:
            self._stopping.set()
            connection = self._connection
            if connection is not None:
                connection.fail_pending()
                connection.close()
            supervisor.kill()
            self._hub.destroy(destroy_loop=True)

    def _supervise(self) -> None:
        # Task boundary of the whole thread: a bug here must not end FreeSWITCH control silently.
        while not self._stopping.is_set():
            try:
                self._supervise_connections()
            except gevent.GreenletExit:
                raise
            except Exception:
                log.exception("the FreeSWITCH event socket supervisor failed; restarting it")
                self._to_loop(self._set_link, False, "supervisor failed")
                gevent.sleep(self.settings.reconnect_max_delay_s)

    def _supervise_connections(self) -> None:
        delay = FIRST_RETRY_DELAY_S
        settings = self.settings
        password = settings.password.get_secret_value() if settings.password else ""
        while not self._stopping.is_set():
            connection = EslConnection(
                settings.host,
                settings.port,
                password,
                CONNECT_TIMEOUT_S,
                lambda event: self._to_loop(self._on_event, event),
            )
            try:
                with gevent.Timeout(CONNECT_TIMEOUT_S, TimeoutError("no auth/request")):
                    connection.connect()
                reply = connection.command(esl.command(self.subscription), CONNECT_TIMEOUT_S)
                if not reply.ok:
                    raise PbxConnectionError(
                        f"FreeSWITCH refused the subscription: {reply.reply_text}"
                    )
            except PbxAuthError as exc:
                connection.close()
                error = PbxAuthError(f"{exc} at {settings.host}:{settings.port}")
                self._to_loop(self._settle_first, error)
                log.error("%s (check freeswitch.password)", error)
                delay = settings.reconnect_max_delay_s
                gevent.sleep(delay)
                continue
            except (
                OSError,
                TimeoutError,
                RemoteProtocolError,
                PbxConnectionError,
                NotConnectedError,
            ) as exc:
                connection.close()
                detail = connection.closed_detail or str(exc) or type(exc).__name__
                failure = PbxConnectionError(
                    f"cannot reach the FreeSWITCH event socket at "
                    f"{settings.host}:{settings.port}: {detail}"
                )
                self._to_loop(self._settle_first, failure)
                log.warning("%s; next try in %.1f s", failure, delay)
                gevent.sleep(delay)
                delay = min(delay * 2, settings.reconnect_max_delay_s)
                continue
            self._connection = connection
            self.connects += 1
            self._to_loop(self._set_link, True, "event socket up")
            self._to_loop(self._settle_first, None)
            log.info(
                "FreeSWITCH event socket up at %s:%s (connection %d)",
                settings.host,
                settings.port,
                self.connects,
            )
            connection._receive_events_greenlet.join()
            connection.fail_pending()
            connection.close()
            self._connection = None
            if self._stopping.is_set():
                break
            detail = connection.closed_detail or "the connection closed"
            self._to_loop(self._set_link, False, detail)
            log.error("FreeSWITCH event socket lost (%s); reconnecting", detail)
            delay = FIRST_RETRY_DELAY_S
            gevent.sleep(delay)

    def _send_in_thread(self, framed: bytes, future: asyncio.Future[esl.EslMessage]) -> None:
        connection = self._connection
        try:
            if connection is None:
                raise PbxConnectionError("the FreeSWITCH event socket is not connected")
            reply = connection.command(framed, self.settings.action_timeout_s)
            self._to_loop(_resolve, future, reply, None)
        except TimeoutError as exc:
            self._to_loop(_resolve, future, None, PbxActionError(str(exc)))
        except (OSError, NotConnectedError, PbxConnectionError) as exc:
            self._to_loop(
                _resolve, future, None, PbxConnectionError(f"FreeSWITCH event socket: {exc}")
            )

    def _drop_in_thread(self) -> None:
        if self._connection is not None:
            self._connection.closed_detail = "no answer to the watchdog's ping"
            self._connection.drop()


def _resolve(
    future: asyncio.Future[esl.EslMessage],
    message: esl.EslMessage | None,
    error: BaseException | None,
) -> None:
    if future.done():  # the caller gave up meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert message is not None
        future.set_result(message)
