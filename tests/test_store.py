from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from bridge.errors import Conflict, StoreError
from bridge.store import MIGRATIONS, ListQuery, Store


async def fetched(store: Store, resource_id: str) -> dict[str, Any]:
    found = await store.get("assistant", resource_id)
    assert found is not None
    return found


def doc(resource_id: str, created: str, **fields: Any) -> dict[str, Any]:
    return {"id": resource_id, "createdAt": created, "updatedAt": created, **fields}


@pytest.fixture
async def store(tmp_path: Path):
    opened = Store(tmp_path / "db" / "s.sqlite3")
    await opened.open()
    yield opened
    await opened.aclose()


async def test_schema_is_versioned_and_data_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    first = Store(path)
    await first.open()
    org = await first.org_id()
    await first.insert("assistant", doc("a1", "2024-01-01T00:00:00.000Z", name="x"))
    await first.aclose()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    second = Store(path)
    await second.open()
    assert await second.org_id() == org
    assert (await fetched(second, "a1"))["name"] == "x"
    await second.aclose()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    store = Store(path)
    with pytest.raises(StoreError, match="newer than this sipbridge"):
        await store.open()
    await store.aclose()


async def test_unusable_file_is_a_store_error(tmp_path: Path) -> None:
    store = Store(tmp_path)  # a directory, not a file
    with pytest.raises(StoreError):
        await store.open()
    await store.aclose()


async def test_work_runs_on_the_store_thread(store: Store) -> None:
    name = await store._run(lambda: threading.current_thread().name, "probe")
    assert name.startswith("sipbridge-store")


async def test_resource_crud_and_listing(store: Store) -> None:
    for index in range(5):
        await store.insert(
            "assistant", doc(f"a{index}", f"2024-01-0{index + 1}T00:00:00.000Z", n=index)
        )
    listed = await store.listing("assistant", ListQuery(limit=3))
    assert [d["id"] for d in listed] == ["a4", "a3", "a2"]
    window = await store.listing(
        "assistant",
        ListQuery(created_gt="2024-01-02T00:00:00.000Z", created_le="2024-01-04T00:00:00.000Z"),
    )
    assert [d["id"] for d in window] == ["a3", "a2"]
    assert await store.replace("assistant", doc("a1", "2024-01-02T00:00:00.000Z", n=99))
    assert (await fetched(store, "a1"))["n"] == 99
    assert not await store.replace("assistant", doc("missing", "2024-01-01T00:00:00.000Z"))
    assert (await store.delete("assistant", "a1") or {}).get("n") == 99
    assert await store.delete("assistant", "a1") is None
    assert await store.get("assistant", "a1") is None


async def test_sip_uris_are_unique_case_insensitively(store: Store) -> None:
    await store.insert(
        "phone_number", doc("p1", "2024-01-01T00:00:00.000Z", sipUri="sip:Alice@Example.com")
    )
    with pytest.raises(Conflict) as caught:
        await store.insert(
            "phone_number", doc("p2", "2024-01-01T00:00:00.000Z", sipUri="sip:alice@EXAMPLE.com")
        )
    assert caught.value.problems == [
        "sipUri: sip:alice@EXAMPLE.com is already used by phone number p1"
    ]
    await store.insert(
        "phone_number", doc("p3", "2024-01-02T00:00:00.000Z", sipUri="sip:alice@other.example")
    )
    found = await store.phone_numbers_for_user("ALICE")
    assert [d["id"] for d in found] == ["p1", "p3"]
    with pytest.raises(Conflict):
        await store.replace(
            "phone_number", doc("p3", "2024-01-02T00:00:00.000Z", sipUri="sip:ALICE@example.com")
        )


async def test_numbers_naming_an_assistant(store: Store) -> None:
    await store.insert(
        "phone_number", doc("p1", "2024-01-01T00:00:00.000Z", sipUri="sip:a@x", assistantId="a1")
    )
    await store.insert("phone_number", doc("p2", "2024-01-01T00:00:00.000Z", sipUri="sip:b@x"))
    assert await store.phone_numbers_with_assistant("a1") == ["p1"]


async def test_call_records_upsert_and_filter(store: Store) -> None:
    def call(call_id: str, status: str, created: str) -> dict[str, Any]:
        return {
            "id": call_id,
            "createdAt": created,
            "updatedAt": created,
            "status": status,
            "phoneNumberId": "p1",
            "assistantId": "a1" if call_id != "c3" else None,
        }

    await store.save_calls(
        [
            call("c1", "ringing", "2024-01-01T00:00:01.000Z"),
            call("c2", "ringing", "2024-01-01T00:00:02.000Z"),
        ]
    )
    await store.save_calls(
        [
            call("c1", "ended", "2024-01-01T00:00:01.000Z"),
            call("c3", "in-progress", "2024-01-01T00:00:03.000Z"),
        ]
    )
    assert (await store.get_call("c1") or {}).get("status") == "ended"
    active = await store.list_calls(ListQuery(), statuses=("ringing", "in-progress"))
    assert [c["id"] for c in active] == ["c3", "c2"]
    by_assistant = await store.list_calls(ListQuery(), assistant_id="a1")
    assert [c["id"] for c in by_assistant] == ["c2", "c1"]
    # The id filter applies before the limit: an old call is found past newer ones.
    only_c1 = await store.list_calls(ListQuery(limit=1), call_id="c1")
    assert [c["id"] for c in only_c1] == ["c1"]
    assert await store.get_call("nope") is None


async def test_closed_store_raises(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    with pytest.raises(StoreError, match="not open"):
        await store.get("assistant", "a")
