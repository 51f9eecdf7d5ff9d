"""The websocket client to a call's conversational pipeline (the websockets library).

One connection per call, opened while the call still rings so that a pipeline that cannot be
reached refuses the call instead of answering it into silence. Settings, after websockets 17.4's
``connect()`` (``websockets/asyncio/client.py``): compression off (``permessage-deflate`` is on by
default; it cannot shrink audio and costs CPU), a small ``max_size``, keepalive pings, and a
reader that always drains: above ``max_queue`` unread frames the connection stops reading the
socket (``websockets/asyncio/messages.py``), so a pong behind them is never seen and a live peer
looks dead. Audio is dropped, not queued, when the pipeline stops reading: latency must not grow
without bound.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Mapping
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.protocol import State

from bridge import __version__
from bridge.errors import PipelineError
from bridge.settings import PipelineSettings

log = logging.getLogger(__name__)

# About 2 s of 16 kHz PCM: beyond that the pipeline is not keeping up and audio is dropped.
MAX_UNSENT_BYTES = 64 * 1024


class PipelineConnection:
    """A call's open websocket, as a ``PipelineStream``."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self.dropped_audio = 0
        self.close_detail = ""

    @classmethod
    async def open(
        cls,
        url: str,
        headers: Mapping[str, str],
        settings: PipelineSettings,
        tls: ssl.SSLContext | None = None,
    ) -> PipelineConnection:
        """Connects within ``settings.connect_timeout_s``.

        Args:
            tls: the context a wss:// URL is opened with (None: websockets' default, the
                system's trust store); unused for ws://, which websockets refuses it for.

        Raises:
            PipelineError: refused, unreachable, timed out, not a websocket, or (wss://) a
                certificate that does not verify.
        """
        # websockets refuses ssl= (even None) with ws://, and makes a default context for wss://.
        options: dict[str, Any] = {}
        if tls is not None and url.lower().startswith("wss://"):
            options["ssl"] = tls
        try:
            ws = await connect(
                url,
                **options,
                additional_headers=dict(headers),
                user_agent_header=f"sipbridge/{__version__}",
                open_timeout=settings.connect_timeout_s,
                ping_interval=settings.ping_interval_s,
                ping_timeout=settings.ping_timeout_s,
                # A failing pipeline must not keep the caller in silence waiting for its goodbye.
                close_timeout=1,
                compression=None,
                max_size=settings.max_message_bytes,
                max_queue=64,
                # send() waits for the transport to drain above the high-water mark; set it
                # above MAX_UNSENT_BYTES so that send_audio drops instead (latency must not
                # grow), while control messages still go through.
                write_limit=4 * MAX_UNSENT_BYTES,
            )
        except ssl.SSLCertVerificationError as exc:
            raise PipelineError(
                f"cannot open the pipeline websocket {url}: certificate verify failed: "
                f"{exc.verify_message} (a private CA goes in tls.ca_file)"
            ) from exc
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            raise PipelineError(
                f"cannot open the pipeline websocket {url}: {exc or 'timeout'}"
            ) from exc
        return cls(ws)

    async def send(self, message: str | bytes) -> None:
        """Sends one message; a closed connection is not an error here (the reader reports it)."""
        with contextlib.suppress(ConnectionClosed):
            await self._ws.send(message)

    def send_audio(self, data: str | bytes) -> bool:
        """Sends audio now, never waiting: dropped (False) when too much is still unsent or the
        connection is no longer open (its reader reports why).

        Through the connection's Sans-I/O protocol straight to the transport: on the 20 ms path
        the coroutine and context manager of ``send()`` cost as much as building the frame,
        and audio has nothing to wait for (``send()`` only ever waits for the transport to
        drain, which audio must not do).
        """
        ws = self._ws
        transport = ws.transport
        if (
            ws.protocol.state is not State.OPEN
            or transport.is_closing()
            or transport.get_write_buffer_size() > MAX_UNSENT_BYTES
        ):
            self.dropped_audio += 1
            return False
        if isinstance(data, bytes):
            ws.protocol.send_binary(data)
        else:
            ws.protocol.send_text(data.encode())
        # Only our frame: the connection flushes the protocol after everything else it does,
        # and an open protocol queues no end-of-stream.
        for chunk in ws.protocol.data_to_send():
            transport.write(chunk)
        return True

    async def receive(self) -> str | bytes | None:
        """The next message, or None once the connection is closed."""
        try:
            return await self._ws.recv()
        except ConnectionClosed as exc:
            # Says which side closed and why ("keepalive ping timeout" for a stalled pipeline).
            self.close_detail = str(exc)
            return None

    @property
    def close_code(self) -> int | None:
        """The close code received (1006 when the connection broke, None while open)."""
        return self._ws.close_code

    async def aclose(self, reason: str = "") -> None:
        """Closes normally."""
        await self._ws.close(1000, reason[:120])
