from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from bridge.errors import StoreError
from bridge.metrics import Metrics
from bridge.records import CallRecorder
from bridge.store import ListQuery, Store


class FlakyStore(Store):
    """A real store whose call writes fail a given number of times first."""

    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(path)
        self.failures = failures
        self.batches: list[list[str]] = []

    async def save_calls(self, documents: Sequence[dict[str, Any]]) -> None:
        self.batches.append([d["id"] for d in documents])
        if self.failures > 0:
            self.failures -= 1
            raise StoreError("disk on fire")
        await super().save_calls(documents)


def record(call_id: str, status: str) -> dict[str, Any]:
    return {
        "id": call_id,
        "createdAt": "2024-01-01T00:00:00.000Z",
        "updatedAt": "2024-01-01T00:00:00.000Z",
        "status": status,
    }


async def test_records_survive_store_failures(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bridge.records.RETRY_MAX_DELAY_S", 0.05)
    store = FlakyStore(tmp_path / "s.sqlite3", failures=2)
    await store.open()
    metrics = Metrics()
    recorder = CallRecorder(store, metrics)
    recorder.start()
    with caplog.at_level(logging.ERROR):
        recorder.save(record("c1", "ringing"))
        assert await recorder.flush(10)
    assert (await store.get_call("c1"))["status"] == "ringing"  # type: ignore[index]
    assert len(store.batches) == 3
    assert "disk on fire" in caplog.text
    assert metrics.store_errors_total.labels("save_calls")._value.get() == 2
    await recorder.aclose()
    await store.aclose()


async def test_snapshots_coalesce_to_the_newest(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path / "s.sqlite3", failures=0)
    await store.open()
    recorder = CallRecorder(store, Metrics())
    for status in ("ringing", "in-progress", "ended"):
        recorder.save(record("c1", status))
    recorder.save(record("c2", "ringing"))
    assert recorder.backlog == 2
    recorder.start()
    assert await recorder.flush(5)
    assert store.batches == [["c1", "c2"]]
    assert sorted(c["status"] for c in await store.list_calls(ListQuery())) == ["ended", "ringing"]
    assert (await store.get_call("c1"))["status"] == "ended"  # type: ignore[index]
    await recorder.aclose()
    await store.aclose()


async def test_shutdown_reports_records_it_could_not_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FlakyStore(tmp_path / "s.sqlite3", failures=10**6)
    await store.open()
    recorder = CallRecorder(store, Metrics())
    recorder.start()
    recorder.save(record("c9", "ended"))
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR):
        await recorder.aclose(timeout_s=0.2)
    assert "c9 could not be saved" in caplog.text
    await store.aclose()


async def test_backlog_is_bounded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path / "s.sqlite3")
    recorder = CallRecorder(store, Metrics(), max_backlog=2)
    with caplog.at_level(logging.ERROR):
        for index in range(3):
            recorder.save(record(f"c{index}", "ringing"))
        recorder.save(record("c0", "ended"))  # an update of a queued record still fits
    assert recorder.backlog == 2
    assert "c2 not saved" in caplog.text
