"""The FreeSWITCH adapter: greenswitch's inbound Event Socket in a thread of its own.

greenswitch runs on gevent and does not monkey-patch, so it lives in one OS thread with its own
gevent hub (libraries.md section 1); the asyncio side talks to it only through the hub's
thread-safe callback and ``loop.call_soon_threadsafe``. What greenswitch 0.0.19 does and what
this module does instead:

- It url-decodes a whole event block before splitting it into lines, so ``%0A`` in a caller's
  X- header injects a header; it folds a BACKGROUND_JOB's result into ``Content-Length``; it
  cannot read JSON events. Here every event body is parsed by :mod:`bridge.protocol.esl`.
- A short read at end of stream makes it spin at 100 % CPU (starving asyncio through the GIL):
  here a short read ends the connection.
- A command waits for its reply forever, and pending commands hang when the socket drops: here
  every command has a timeout (after which the connection is dropped, since replies are matched
  by order and one that never came would shift all the others), and a drop fails them at once.
- Its ``connect()`` waits for FreeSWITCH's ``auth/request`` with no limit: here within the
  connect timeout. A refused password is :class:`PbxAuthError` on the first connect.
- It polls its event queue every second: events are handed to asyncio as they are read.

A supervisor in the gevent thread reconnects with backoff; an asyncio watchdog sets the global
``sipbridge_heartbeat`` variable every ``ping_interval_s`` (the dialplan refuses calls while it
is stale) and drops a link that does not answer in time (a half-open connection is noticed
within two intervals).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import gevent
import gevent.event
import greenswitch
from greenswitch.esl import NotConnectedError

from bridge.errors import (
    LocalProtocolError,
    PbxActionError,
    PbxAuthError,
    PbxConnectionError,
    PbxError,
    RemoteProtocolError,
)
from bridge.events import InviteFacts, PbxKind
from bridge.protocol import esl
from bridge.settings import FreeswitchSettings
from bridge.tasks import TaskSet, cancel_and_wait

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
FIRST_RETRY_DELAY_S = 0.5
# The events the adapter needs, nothing else (event plain ALL is ~80 messages per call).
SUBSCRIPTION = "event plain CHANNEL_PARK CHANNEL_HANGUP_COMPLETE DTMF BACKGROUND_JOB"
# Set by every watchdog ping; freeswitch_conf/sipbridge.xml checks that it is fresh.
HEARTBEAT_VARIABLE = "sipbridge_heartbeat"
HEARTBEAT_COMMAND = f"api expand global_setvar {HEARTBEAT_VARIABLE}=${{strepoch()}}"

EventHandler = Callable[[esl.EslEvent], None]
LinkHandler = Callable[[bool, str], None]


class _EslConnection(greenswitch.InboundESL):  # type: ignore[misc]
    """greenswitch's inbound connection with its read path fixed (see the module docstring)."""

    def __init__(
        self, host: str, port: int, password: str, timeout: float, on_event: EventHandler
    ) -> None:
        super().__init__(host, port, password, timeout)
        self._on_event_parsed = on_event
        self.closed_detail = ""

    def start_event_handlers(self) -> None:
        # Only the reader: events go straight to asyncio, not through greenswitch's polled queue.
        self._receive_events_greenlet = gevent.spawn(self.receive_events)

    def receive_events(self) -> None:
        try:
            super().receive_events()
        finally:
            # The stream ended: a connect() still waiting for auth/request learns it now,
            # instead of after its whole timeout.
            self.connected = False
            self._auth_request_event.set()

    def _read_exact(self, length: int) -> bytes:
        data: bytes = self.sock_file.read(length) if length else b""
        if len(data) < length:
            raise ConnectionError(f"ESL socket closed {length - len(data)} bytes short of a body")
        return data

    def handle_event(self, event: Any) -> None:
        try:
            self._handle(event)
        except (ConnectionError, OSError, ValueError, RemoteProtocolError) as exc:
            # The stream is no longer in step: end this connection; the supervisor reconnects.
            self.closed_detail = str(exc)
            log.error("FreeSWITCH event socket: %s", exc)
            self._run = False
            self.connected = False
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def _handle(self, event: Any) -> None:
        headers: dict[str, str] = event.headers
        kind = headers.get("Content-Type", "")
        length = esl.content_length(headers.items())
        if kind in (esl.EVENT_PLAIN, esl.EVENT_JSON):
            body = self._read_exact(length)
            try:
                parsed = esl.parse_event(esl.EslMessage((("Content-Type", kind),), body))
            except RemoteProtocolError as exc:
                log.warning("ignored a malformed FreeSWITCH event: %s", exc)
                return
            self._on_event_parsed(parsed)
        elif kind == esl.API_RESPONSE:
            event.data = self._read_exact(length).decode("utf-8", errors="replace")
            self._reply(event)
        elif kind == esl.COMMAND_REPLY:
            event.data = headers.get("Reply-Text", "")
            self._reply(event)
        elif kind == esl.DISCONNECT_NOTICE:
            self._read_exact(length)  # greenswitch leaves this body in the stream
            if headers.get("Content-Disposition") != "linger":
                self.closed_detail = "FreeSWITCH sent a disconnect notice"
                self.connected = False
        elif kind == esl.AUTH_REQUEST:
            self._auth_request_event.set()
        else:
            self._read_exact(length)  # rude rejection, log data: not ours to act on
            if kind == "text/rude-rejection":
                self.closed_detail = "FreeSWITCH rejected the connection (acl)"
                self.connected = False
                self._auth_request_event.set()

    def _reply(self, event: Any) -> None:
        if not self._commands_sent:
            raise RemoteProtocolError("an ESL reply that answers no command")
        self._commands_sent.pop(0).set(event)

    def command(self, text: str, timeout_s: float) -> Any:
        """Sends one framed command and waits for its reply (in the gevent thread)."""
        if not self.connected:
            raise NotConnectedError("ESL is not connected")
        reply = gevent.event.AsyncResult()
        self._commands_sent.append(reply)
        self.sock.sendall(text.encode())
        try:
            return reply.get(timeout=timeout_s)
        except gevent.Timeout:
            self.closed_detail = f"no reply to {text.split(chr(10), 1)[0][:60]!r} in {timeout_s} s"
            self.drop()
            raise TimeoutError(self.closed_detail) from None

    def drop(self) -> None:
        """Ends the connection from any greenlet; the reader sees the end and returns."""
        self._run = False
        self.connected = False
        with contextlib.suppress(OSError, AttributeError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def fail_pending(self) -> None:
        """Every command still waiting fails now (greenswitch would leave them hanging)."""
        pending, self._commands_sent[:] = list(self._commands_sent), []
        for reply in pending:
            reply.set_exception(NotConnectedError("ESL connection closed"))

    def close(self) -> None:
        """Ends the connection and frees its socket (in the gevent thread)."""
        self.drop()
        reader = self._receive_events_greenlet
        if reader is not None and reader is not gevent.getcurrent():
            # The reader must leave its read before the file under it is closed.
            reader.join(timeout=1.0)
        with contextlib.suppress(OSError, AttributeError):
            self.sock.close()
        with contextlib.suppress(OSError, AttributeError):
            self.sock_file.close()


class EslLink:
    """The supervised Event Socket connection, run in its own thread with its own gevent hub.

    Events reach ``on_event`` and link changes ``on_link`` on the asyncio loop that called
    :meth:`start`. :meth:`command` may be awaited from that loop.
    """

    def __init__(
        self, settings: FreeswitchSettings, on_event: EventHandler, on_link: LinkHandler
    ) -> None:
        self.settings = settings
        self._on_event = on_event
        self._on_link = on_link
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._hub: Any = None
        self._stop_watcher: Any = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._first: asyncio.Future[None] | None = None
        self._connection: _EslConnection | None = None
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
        text = framed.decode()
        future: asyncio.Future[esl.EslMessage] = self._loop.create_future()
        try:
            self._hub.loop.run_callback_threadsafe(gevent.spawn, self._send_in_thread, text, future)
        except (ValueError, AttributeError):  # the thread stopped meanwhile
            raise PbxConnectionError("the FreeSWITCH event socket is closed") from None
        try:
            async with asyncio.timeout(self.settings.action_timeout_s + 1.0):
                return await future
        except TimeoutError:
            raise PbxActionError(f"FreeSWITCH did not answer {text.split(chr(10))[0]!r}") from None

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
            connection = _EslConnection(
                settings.host,
                settings.port,
                password,
                CONNECT_TIMEOUT_S,
                lambda event: self._to_loop(self._on_event, event),
            )
            try:
                with gevent.Timeout(CONNECT_TIMEOUT_S, TimeoutError("no auth/request")):
                    connection.connect()
                reply = connection.command(esl.command(SUBSCRIPTION).decode(), CONNECT_TIMEOUT_S)
                if not str(reply.data).startswith("+OK"):
                    raise PbxConnectionError(f"FreeSWITCH refused the subscription: {reply.data}")
            except ValueError as exc:  # greenswitch: 'Invalid password.'
                connection.close()
                error = PbxAuthError(
                    f"FreeSWITCH refused the event socket password at "
                    f"{settings.host}:{settings.port} ({exc})"
                )
                self._to_loop(self._settle_first, error)
                log.error("%s (check freeswitch.password)", error)
                delay = settings.reconnect_max_delay_s
                gevent.sleep(delay)
                continue
            except (
                OSError,
                TimeoutError,
                KeyError,  # greenswitch reading a reply without the header it expects
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

    def _send_in_thread(self, text: str, future: asyncio.Future[esl.EslMessage]) -> None:
        connection = self._connection
        try:
            if connection is None:
                raise PbxConnectionError("the FreeSWITCH event socket is not connected")
            reply = connection.command(text, self.settings.action_timeout_s)
            kind = reply.headers.get("Content-Type", "")
            message = esl.EslMessage(
                (("Content-Type", kind), ("Reply-Text", reply.headers.get("Reply-Text", ""))),
                str(reply.data).encode() if kind == esl.API_RESPONSE else b"",
            )
            self._to_loop(_resolve, future, message, None)
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


# ---- the adapter ---------------------------------------------------------------------------------

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


class FreeswitchSink(Protocol):
    """Where the adapter reports calls (the call flow, through the composition root)."""

    def offered(self, facts: InviteFacts, truncated: bool) -> None:
        """A call waits for a decision."""

    def hung_up(self, pbx_call_id: str, cause: int) -> None:
        """A channel is gone."""

    def dtmf(self, pbx_call_id: str, digit: str) -> None:
        """The caller pressed a key (FreeSWITCH reports it as an event, not in the audio)."""

    def link_changed(self, up: bool, detail: str) -> None:
        """The event socket went up or down."""

    def known_calls(self) -> set[str]:
        """Unique ids of the calls the flow still considers live."""


# (facts, call id, FreeSWITCH's unicast address) -> the address FreeSWITCH should send to.
MediaEndpoint = Callable[[InviteFacts, str, tuple[str, int]], Awaitable[tuple[str, int]]]


def _argument(value: str) -> str:
    """A value as the last argument of an api command (switch_separate_string strips quotes and
    backslashes unless they are escaped)."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


class FreeswitchAdapter:
    """Turns Event Socket events into call-flow events and carries out its decisions.

    A call is offered when FreeSWITCH parks it with ``<offer_variable>=true`` set (see
    ``freeswitch_conf/sipbridge.xml``): ringing, X- headers in its ``sip_h_X-*`` variables.

    Args:
        settings: the ``[freeswitch]`` settings.
        sink: where calls are reported.
        media_endpoint: opens a call's UDP leg and says where FreeSWITCH should send its audio.
    """

    kind: PbxKind = "freeswitch"

    def __init__(
        self,
        settings: FreeswitchSettings,
        sink: FreeswitchSink,
        media_endpoint: MediaEndpoint,
        on_transferred: Callable[[str], None] = lambda channel: None,
    ) -> None:
        self.settings = settings
        self._sink = sink
        self._media_endpoint = media_endpoint
        self.link = EslLink(settings, self._on_event, self._on_link)
        self._announced: set[str] = set()
        self._ports = UnicastPorts(settings.unicast_port_min, settings.unicast_port_max)
        self._tasks = TaskSet("freeswitch")
        self._watchdog: asyncio.Task[None] | None = None
        self._on_transferred = on_transferred
        self._kills_pending: set[str] = set()

    async def start(self) -> None:
        """Connects (a refused password is an error at once), then watches the link.

        Raises:
            PbxAuthError: wrong event socket password.
        """
        await self.link.start()
        self._watchdog = asyncio.create_task(self._watch(), name="freeswitch-watchdog")

    async def aclose(self) -> None:
        """Stops the watchdog and the link."""
        if self._watchdog is not None:
            await cancel_and_wait([self._watchdog])
            self._watchdog = None
        await self._tasks.aclose()
        await self.link.aclose()

    async def _watch(self) -> None:
        interval = self.settings.ping_interval_s
        while True:
            await asyncio.sleep(interval)
            if not self.link.up:
                continue
            try:
                async with asyncio.timeout(interval):
                    # The ping is the heartbeat: freeswitch_conf's dialplan refuses calls at once
                    # (480) when it is stale, instead of parking them for a sipbridge that is gone.
                    # FreeSWITCH stamps it with its own clock (expand), so no clock skew matters.
                    await self.link.command(esl.command(HEARTBEAT_COMMAND))
            except (TimeoutError, PbxActionError):
                log.error("FreeSWITCH answered no ping in %.1f s: dropping the link", interval)
                self.link.drop()
            except PbxConnectionError:
                continue

    # ---- events ---------------------------------------------------------------------------------

    def _on_link(self, up: bool, detail: str) -> None:
        self._sink.link_changed(up, detail)
        if up:
            self._tasks.spawn(self._resync(), "resync")

    async def _resync(self) -> None:
        """Ends the calls whose channels went away while the event socket was down, and the
        channels whose hangup could not be sent then."""
        for channel in sorted(self._kills_pending):
            log.info("hanging up %s, which could not be hung up while the link was down", channel)
            try:
                await self.hang_up_channel(channel)
            except PbxError as exc:
                log.warning("resync: %s", exc)
                return
        for uniqueid in sorted(self._sink.known_calls()):
            try:
                reply = await self.link.command(esl.command(f"api uuid_dump {uniqueid}"))
            except PbxError as exc:
                log.warning("resync: %s", exc)
                return
            if reply.text.startswith("-ERR"):
                log.info("call %s ended while the event socket was away", uniqueid)
                self._forget(uniqueid)
                self._sink.hung_up(uniqueid, 0)

    def _on_event(self, event: esl.EslEvent) -> None:
        name, uniqueid = event.name, event.unique_id or ""
        if name == "CHANNEL_PARK":
            if event.headers.get(f"variable_{self.settings.offer_variable}") != "true":
                return
            if uniqueid in self._announced:
                return  # parked again (after a uuid_transfer, a re-park): one channel, one call
            try:
                facts = esl.invite_facts_of(event)
            except RemoteProtocolError as exc:
                log.warning("ignored a parked call: %s", exc)
                return
            self._announced.add(uniqueid)
            self._sink.offered(facts, False)
        elif name == "CHANNEL_HANGUP_COMPLETE" and uniqueid:
            self._forget(uniqueid)
            cause = event.headers.get("variable_hangup_cause_q850", "0")
            self._sink.hung_up(uniqueid, int(cause) if cause.isdigit() else 0)
        elif name == "DTMF" and uniqueid:
            digit = event.headers.get("DTMF-Digit", "")
            if len(digit) == 1 and digit in "0123456789*#ABCD":
                self._sink.dtmf(uniqueid, digit)

    def _forget(self, uniqueid: str) -> None:
        self._announced.discard(uniqueid)
        self._ports.release(uniqueid)

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
        """Answers the INVITE with ``sip_status`` (``respond``), then hangs the channel up."""
        cause = _CAUSE_FOR_STATUS.get(sip_status, "CALL_REJECTED")
        try:
            await self._sendmsg(esl.execute(facts.channel, "respond", str(sip_status)), "respond")
        finally:
            # Even when respond failed: a caller must not ring on for nobody.
            with contextlib.suppress(PbxActionError):
                await self._sendmsg(esl.hangup(facts.channel, cause), "hangup")

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
        ours = await self._media_endpoint(facts, call_id, freeswitch)
        await self._sendmsg(esl.execute(facts.channel, "answer"), "answer")
        await self._sendmsg(esl.unicast(facts.channel, freeswitch, ours), "unicast")

    async def transfer(self, facts: InviteFacts, destination: Mapping[str, Any]) -> None:
        """Blind transfer through ``freeswitch_conf``'s ``sipbridge_transfer`` extension.

        Raises:
            PbxActionError: the destination cannot be dialled safely.
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
        # FreeSWITCH copies a channel's sip_h_X-* variables into the INVITE it sends out, and
        # the caller's own X- headers are such variables: only the destination's go, as with
        # Asterisk.
        asked = {name.lower() for name in headers}
        for name, _ in facts.headers:
            if name.lower() not in asked and _SIP_HEADER_NAME.match(name):
                await self._api(f"uuid_setvar {facts.channel} sip_h_{name}")
        for name, value in headers.items():
            await self._api(f"uuid_setvar {facts.channel} sip_h_{name} {_argument(value)}")
        await self._api(f"uuid_setvar {facts.channel} sipbridge_transfer_target {target}")
        # Not an offer any more, should the transfer's dialplan park it again.
        await self._api(f"uuid_setvar {facts.channel} {self.settings.offer_variable}")
        await self._api(
            f"uuid_transfer {facts.channel} sipbridge_transfer XML {self.settings.transfer_context}"
        )
        # The channel now belongs to the transfer: the end of the conversation must not kill it.
        self._ports.release(facts.pbx_call_id)
        self._on_transferred(facts.channel)

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


class UnicastPorts:
    """FreeSWITCH-side unicast ports, one per call, reused after the call."""

    def __init__(self, low: int, high: int) -> None:
        self._free = list(range(low, high + 1))
        self._taken: dict[str, int] = {}

    def take(self, owner: str) -> int:
        """A port for ``owner`` (the same one if it has one).

        Raises:
            PbxActionError: every port is in use.
        """
        if owner in self._taken:
            return self._taken[owner]
        if not self._free:
            raise PbxActionError("no FreeSWITCH unicast port is free")
        port = self._free.pop(0)
        self._taken[owner] = port
        return port

    def release(self, owner: str) -> None:
        """Gives ``owner``'s port back (at the end of the queue: reused last)."""
        port = self._taken.pop(owner, None)
        if port is not None:
            self._free.append(port)
