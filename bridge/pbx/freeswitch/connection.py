"""One inbound Event Socket connection: greenswitch's socket, read by our sans-I/O decoder.

greenswitch 0.0.19 (``greenswitch/esl.py``) connects, waits for FreeSWITCH's ``auth/request``
and keeps the queue of commands waiting for replies; everything it does with the bytes is
replaced here, because its reader:

- decodes each line as strict UTF-8 (one stray byte from a caller's header drops the link) and
  url-decodes a whole event block before splitting it into lines, so ``%0A`` in a caller's X-
  header injects a header;
- folds a BACKGROUND_JOB's result into ``Content-Length`` and cannot read JSON events;
- spins at 100 % CPU on a short read at the end of the stream (starving asyncio through the
  GIL), and leaves a disconnect notice's body in the stream;
- waits for a command's reply forever, and leaves pending commands hanging when the socket
  drops.

Here the socket's bytes go to :class:`bridge.protocol.esl.EslDecoder`, the same decoder the
tests prove on FreeSWITCH's captured traffic; events are handed on as they are decoded, every
command has a timeout, and a drop fails every pending command at once. All of this runs in the
link's gevent thread (:mod:`bridge.pbx.freeswitch.link`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import greenswitch
from greenswitch.esl import NotConnectedError

from bridge.errors import PbxAuthError, RemoteProtocolError
from bridge.protocol import esl

log = logging.getLogger(__name__)

READ_BYTES = 65536

EventHandler = Callable[[esl.EslEvent], None]


class EslConnection(greenswitch.InboundESL):  # type: ignore[misc]
    """An inbound Event Socket connection whose stream is parsed by :class:`esl.EslDecoder`.

    Args:
        on_event: called (in the gevent thread) with every event, in order.
    """

    def __init__(
        self, host: str, port: int, password: str, timeout: float, on_event: EventHandler
    ) -> None:
        super().__init__(host, port, password, timeout)
        self._run: bool = True
        self._on_event = on_event
        self._decoder = esl.EslDecoder()
        # Why the connection ended, for the log line and the health detail.
        self.closed_detail = ""

    def start_event_handlers(self) -> None:
        # Only the reader: events are handed on as decoded, not through greenswitch's polled
        # queue (which it reads once a second).
        self._receive_events_greenlet = gevent.spawn(self.receive_events)

    def receive_events(self) -> None:
        """Reads the stream until it ends or stops making sense."""
        try:
            while self._run:
                data = self.sock.recv(READ_BYTES)
                if not data:
                    self._decoder.receive_eof()
                    self.closed_detail = self.closed_detail or "FreeSWITCH closed the connection"
                    return
                self._decoder.receive_data(data)
                while (message := self._decoder.next_message()) is not None:
                    self._handle(message)
        except RemoteProtocolError as exc:
            # The stream is no longer in step (a cut in the middle of a message, a bad length).
            self.closed_detail = str(exc)
            log.error("FreeSWITCH event socket: %s", exc)
        except OSError as exc:
            self.closed_detail = self.closed_detail or f"event socket read failed: {exc}"
        finally:
            self._run = False
            self.connected = False
            # A connect() still waiting for auth/request learns it now, not after its timeout.
            self._auth_request_event.set()
            self.fail_pending()

    def _handle(self, message: esl.EslMessage) -> None:
        kind = message.content_type
        if kind in (esl.EVENT_PLAIN, esl.EVENT_JSON):
            try:
                event = esl.parse_event(message)
            except RemoteProtocolError as exc:
                log.warning("ignored a malformed FreeSWITCH event: %s", exc)
                return
            self._on_event(event)
        elif kind in (esl.API_RESPONSE, esl.COMMAND_REPLY):
            if not self._commands_sent:
                if not self._run:
                    return  # closing: the commands still waiting were failed already
                raise RemoteProtocolError("an ESL reply that answers no command")
            self._commands_sent.pop(0).set(message)
        elif kind == esl.AUTH_REQUEST:
            self._auth_request_event.set()
        elif kind == esl.DISCONNECT_NOTICE:
            if message.get("Content-Disposition") != "linger":
                self.closed_detail = "FreeSWITCH sent a disconnect notice"
                self.connected = False
        elif kind == "text/rude-rejection":
            self.closed_detail = "FreeSWITCH rejected the connection (acl)"
            self.connected = False
            self._auth_request_event.set()
        # Anything else (log/data) is not ours to act on; its body is already consumed.

    def authenticate(self) -> None:
        """Sends the password (greenswitch's own waits for the reply forever).

        Raises:
            PbxAuthError: FreeSWITCH refused it.
        """
        reply = self.command(esl.command(f"auth {self.password}"), self.timeout)
        if reply.reply_text != "+OK accepted":
            raise PbxAuthError(f"FreeSWITCH refused the event socket password ({reply.reply_text})")

    def command(self, framed: bytes, timeout_s: float) -> esl.EslMessage:
        """Sends one framed command (:func:`esl.command`, :func:`esl.sendmsg`) and waits for
        its reply.

        Raises:
            NotConnectedError: the connection is closed or closes meanwhile.
            TimeoutError: no reply in time (the connection is dropped: replies are matched by
                order, and one that never came would shift every later one).
        """
        if not self.connected:
            raise NotConnectedError("ESL is not connected")
        reply: Any = gevent.event.AsyncResult()
        self._commands_sent.append(reply)
        self.sock.sendall(framed)
        try:
            message: esl.EslMessage = reply.get(timeout=timeout_s)
        except gevent.Timeout:
            first_line = framed.split(b"\n", 1)[0][:60].decode(errors="replace")
            self.closed_detail = f"no reply to {first_line!r} in {timeout_s} s"
            self.drop()
            raise TimeoutError(self.closed_detail) from None
        return message

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
        """Ends the connection and frees its socket."""
        self.drop()
        reader = self._receive_events_greenlet
        if reader is not None and reader is not gevent.getcurrent():
            # The reader must leave its read before the socket under it is closed.
            reader.join(timeout=1.0)
        with contextlib.suppress(OSError, AttributeError):
            self.sock.close()
        with contextlib.suppress(OSError, AttributeError):
            self.sock_file.close()
