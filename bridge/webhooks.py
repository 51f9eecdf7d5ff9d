"""Server-message delivery over HTTP (aiohttp client): signing, timeouts, retries, ordering.

Authentication, after Vapi's: when the target server has a ``secret`` it is sent as the legacy
``x-vapi-secret`` header (``serverUrlSecret`` in Vapi's API reference,
docs.vapi.ai/api-reference/phone-numbers/update), and every message is signed with HMAC-SHA256
over ``"<timestamp>.<body>"`` (hex, in ``x-signature``; the Unix time in seconds in
``x-timestamp``; names configurable) using the server's secret, else ``webhooks.signing_secret``.
Header names and payload are the defaults of Vapi's ``HMACAuthenticationPlan`` (its API reference;
docs.vapi.ai/server-url/server-authentication). Each message carries an idempotency id
(``x-message-id``) that stays the same across retries.

:class:`WebhookDispatcher` queues status updates and reports so that delivery never delays a
call: messages of one call go out in order, different calls in parallel, the queue is bounded,
and 5xx answers and network errors are retried with exponential backoff.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import ssl
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from bridge import __version__
from bridge.messages import WebhookTarget
from bridge.metrics import Metrics
from bridge.routing import ASSISTANT_REQUEST_BUDGET_S, WebhookResult
from bridge.settings import WebhookSettings
from bridge.tasks import cancel_and_wait

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 1 << 20
USER_AGENT = f"sipbridge/{__version__}"


def open_session(settings: WebhookSettings, tls: ssl.SSLContext | None) -> aiohttp.ClientSession:
    """The HTTP session server messages go out on.

    Args:
        tls: the context https:// server URLs are verified with (see :mod:`bridge.tls`);
            None: aiohttp's default, the system's trust store.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=settings.concurrency * 4, ssl=tls or True)
    )


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """HMAC-SHA256 (hex) of ``"<timestamp>.<body>"``; what a receiver recomputes to verify."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """The exact bytes POSTed (and signed)."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def request_headers(
    target: WebhookTarget,
    body: bytes,
    message_id: str,
    settings: WebhookSettings,
    unix_time: float,
) -> dict[str, str]:
    """Headers of one POST: the server's own ``headers`` first, then ours (which win).

    HTTP header names are case-insensitive, so a server header spelled ``content-type`` or
    ``X-Vapi-Secret`` is replaced by ours, never sent beside it.
    """
    ours = {
        "content-type",
        "user-agent",
        "x-vapi-secret",
        settings.message_id_header.lower(),
        settings.timestamp_header.lower(),
        settings.signature_header.lower(),
    }
    headers = {name: value for name, value in target.headers.items() if name.lower() not in ours}
    headers["Content-Type"] = "application/json"
    headers["User-Agent"] = USER_AGENT
    headers[settings.message_id_header] = message_id
    if target.secret:
        headers["x-vapi-secret"] = target.secret
    key = target.secret or (
        settings.signing_secret.get_secret_value() if settings.signing_secret else None
    )
    if key:
        timestamp = int(unix_time)
        headers[settings.timestamp_header] = str(timestamp)
        headers[settings.signature_header] = signature(key, timestamp, body)
    return headers


async def _read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, or None as soon as it exceeds ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class WebhookClient:
    """Sends one message and reports what happened; never raises for the server's faults."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: WebhookSettings,
        metrics: Metrics,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._session = session
        self._settings = settings
        self._metrics = metrics
        self._wall_clock = wall_clock

    async def post(
        self,
        target: WebhookTarget,
        body: bytes,
        *,
        message_type: str,
        message_id: str,
        timeout_s: float,
    ) -> WebhookResult:
        """One POST with a total time limit.

        Returns:
            The status and body, or a failure description (timeout, connection error, too large).
        """
        headers = request_headers(target, body, message_id, self._settings, self._wall_clock())
        started = time.monotonic()
        result_label = "ok"
        try:
            async with self._session.post(
                target.url,
                data=body,
                headers=headers,
                # aiohttp rounds a deadline of 5 s or more up to a whole second of the loop's
                # clock (ceil_threshold, helpers.TimeoutHandle): the 7.5 s budget became
                # 8-8.5 s. An infinite threshold keeps every deadline exact.
                timeout=aiohttp.ClientTimeout(total=timeout_s, ceil_threshold=math.inf),
            ) as response:
                answer = await _read_limited(response, MAX_ANSWER_BYTES)
                if answer is None:
                    result_label = "http_error"
                    return WebhookResult(
                        None, failure=f"answer larger than {MAX_ANSWER_BYTES} bytes"
                    )
                if not 200 <= response.status < 300:
                    result_label = "http_error"
                return WebhookResult(response.status, answer)
        except TimeoutError:
            result_label = "timeout"
            return WebhookResult(None, failure=f"no answer within {timeout_s:g} s")
        except aiohttp.ClientConnectorCertificateError as exc:
            result_label = "connection_error"
            error = exc.certificate_error
            reason = getattr(error, "verify_message", None) or str(error)
            return WebhookResult(
                None,
                failure=f"certificate verify failed: {reason} (a private CA goes in tls.ca_file)",
            )
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            result_label = "connection_error"
            return WebhookResult(None, failure=f"{type(exc).__name__}: {exc}".rstrip(": "))
        finally:
            self._metrics.webhook_seconds.labels(message_type, result_label).observe(
                time.monotonic() - started
            )

    async def assistant_request(
        self,
        target: WebhookTarget,
        payload: Mapping[str, Any],
        budget_s: float = ASSISTANT_REQUEST_BUDGET_S,
    ) -> WebhookResult:
        """The assistant-request: one attempt within Vapi's fixed 7.5 s (timeoutSeconds ignored)."""
        return await self.post(
            target,
            encode_payload(payload),
            message_type="assistant-request",
            message_id=str(uuid.uuid4()),
            timeout_s=budget_s,
        )


@dataclass
class _Pending:
    target: WebhookTarget
    body: bytes
    message_type: str
    message_id: str
    call_id: str


class WebhookDispatcher:
    """Delivers status updates and reports in the background, in order per call."""

    def __init__(self, client: WebhookClient, settings: WebhookSettings, metrics: Metrics) -> None:
        self._client = client
        self._settings = settings
        self._metrics = metrics
        self._queues: dict[str, deque[_Pending]] = {}
        self._ready: asyncio.Queue[str] = asyncio.Queue()
        self._pending = 0
        self._workers: list[asyncio.Task[None]] = []
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def pending(self) -> int:
        """Messages queued or in flight."""
        return self._pending

    def start(self) -> None:
        """Starts the delivery workers (owned by this dispatcher, stopped by :meth:`aclose`)."""
        for index in range(self._settings.concurrency):
            self._workers.append(asyncio.create_task(self._work(), name=f"webhook-worker-{index}"))

    def submit(
        self, call_id: str, target: WebhookTarget, payload: Mapping[str, Any], message_type: str
    ) -> bool:
        """Queues a message; returns False (and counts a drop) when the queue is full."""
        if self._pending >= self._settings.max_pending:
            self._metrics.webhook_dropped_total.labels("queue_full").inc()
            log.error(
                "webhook queue full (%d); dropped %s for call %s",
                self._pending,
                message_type,
                call_id,
            )
            return False
        item = _Pending(target, encode_payload(payload), message_type, str(uuid.uuid4()), call_id)
        self._pending += 1
        self._idle.clear()
        queue = self._queues.get(call_id)
        if queue is None:
            self._queues[call_id] = deque([item])
            self._ready.put_nowait(call_id)
        else:
            queue.append(item)
        return True

    async def _work(self) -> None:
        while True:
            call_id = await self._ready.get()
            queue = self._queues[call_id]
            item = queue.popleft()
            try:
                await self._deliver(item)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("delivering %s for call %s failed", item.message_type, call_id)
            finally:
                self._pending -= 1
                if queue:
                    self._ready.put_nowait(call_id)
                else:
                    del self._queues[call_id]
                if self._pending == 0:
                    self._idle.set()

    async def _deliver(self, item: _Pending) -> None:
        timeout = item.target.timeout_s or self._settings.default_timeout_s
        delay = self._settings.retry_base_delay_s
        attempts = self._settings.max_retries + 1
        for attempt in range(1, attempts + 1):
            result = await self._client.post(
                item.target,
                item.body,
                message_type=item.message_type,
                message_id=item.message_id,
                timeout_s=timeout,
            )
            if result.status is not None and 200 <= result.status < 300:
                log.debug(
                    "delivered %s for call %s (attempt %d)",
                    item.message_type,
                    item.call_id,
                    attempt,
                )
                return
            retryable = result.status is None or result.status >= 500 or result.status == 429
            what = f"HTTP {result.status}" if result.status is not None else result.failure
            if not retryable:
                self._metrics.webhook_dropped_total.labels("rejected").inc()
                log.warning(
                    "%s for call %s refused by %s: %s (not retried)",
                    item.message_type,
                    item.call_id,
                    item.target.url,
                    what,
                )
                return
            if attempt == attempts:
                break
            log.info(
                "%s for call %s to %s failed (%s); retry %d/%d in %.1f s",
                item.message_type,
                item.call_id,
                item.target.url,
                what,
                attempt,
                self._settings.max_retries,
                delay,
            )
            await asyncio.sleep(delay)
            delay *= 2
        self._metrics.webhook_dropped_total.labels("retries_exhausted").inc()
        log.error(
            "gave up delivering %s for call %s to %s after %d attempts",
            item.message_type,
            item.call_id,
            item.target.url,
            attempts,
        )

    async def drain(self, timeout_s: float) -> bool:
        """Waits until nothing is pending; False if ``timeout_s`` passed first."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def aclose(self, drain_timeout_s: float = 5.0) -> None:
        """Delivers what is queued (up to ``drain_timeout_s``), then stops the workers."""
        if not await self.drain(drain_timeout_s):
            log.error("shutting down with %d server messages undelivered", self._pending)
        await cancel_and_wait(self._workers)
        self._workers.clear()
