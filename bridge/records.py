"""Call records written behind the call: a store failure never reaches a call in progress.

:meth:`CallRecorder.save` only remembers the newest snapshot of a call; one writer task flushes
snapshots in batches. When the store fails, the snapshots stay queued and the writer retries with
backoff, so a record is late rather than lost. On shutdown :meth:`aclose` flushes what it can and
logs any record it could not write.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from bridge.errors import StoreError
from bridge.metrics import Metrics
from bridge.store import Store
from bridge.tasks import cancel_and_wait

log = logging.getLogger(__name__)

RETRY_MAX_DELAY_S = 30.0


class CallRecorder:
    """Coalescing write-behind queue of call records."""

    def __init__(self, store: Store, metrics: Metrics, max_backlog: int = 100_000) -> None:
        self._store = store
        self._metrics = metrics
        self._max_backlog = max_backlog
        self._dirty: dict[str, dict[str, Any]] = {}
        self._wake = asyncio.Event()
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def backlog(self) -> int:
        """Records waiting to be written."""
        return len(self._dirty)

    def unsaved(self, call_id: str) -> dict[str, Any] | None:
        """The newest snapshot of a call not yet written, so reads never see a stale record."""
        return self._dirty.get(call_id)

    def unsaved_records(self) -> list[dict[str, Any]]:
        """Every snapshot not yet written."""
        return list(self._dirty.values())

    def start(self) -> None:
        """Starts the writer task (stopped by :meth:`aclose`)."""
        self._task = asyncio.create_task(self._write_loop(), name="call-recorder")

    def save(self, record: dict[str, Any]) -> None:
        """Queues the newest version of a call record; never blocks, never raises."""
        if record["id"] not in self._dirty and len(self._dirty) >= self._max_backlog:
            log.error(
                "call record backlog full (%d); record %s not saved",
                self._max_backlog,
                record["id"],
            )
            return
        self._dirty[record["id"]] = record
        self._flushed.clear()
        self._wake.set()

    async def _write_loop(self) -> None:
        delay = 0.5
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._dirty:
                batch = dict(self._dirty)
                try:
                    await self._store.save_calls(list(batch.values()))
                except StoreError as exc:
                    self._metrics.store_errors_total.labels("save_calls").inc()
                    log.error(
                        "saving %d call records failed (%s); retrying in %.1f s",
                        len(batch),
                        exc,
                        delay,
                    )
                    if self._closing:
                        return
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_DELAY_S)
                    continue
                delay = 0.5
                for call_id, record in batch.items():
                    # A newer snapshot that arrived during the write stays queued.
                    if self._dirty.get(call_id) is record:
                        del self._dirty[call_id]
            self._flushed.set()

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Waits until every queued record is written; False on timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._flushed.wait()
        except TimeoutError:
            return False
        return True

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Writes what is queued (within ``timeout_s``) and stops."""
        if not await self.flush(timeout_s):
            for call_id in self._dirty:
                log.error("call record %s could not be saved before shutdown", call_id)
        self._closing = True
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
