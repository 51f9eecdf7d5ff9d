from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from bridge.errors import Conflict, StoreError
from bridge.store import MIGRATIONS, ListQuery, Store, StoreHealth


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
    secret = await first.recording_url_secret()
    await first.insert("assistant", doc("a1", "2024-01-01T00:00:00.000Z", name="x"))
    await first.aclose()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    second = Store(path)
    await second.open()
    assert await second.org_id() == org
    assert await second.recording_url_secret() == secret and len(secret) == 64
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


# ---- a damaged or read-only file -----------------------------------------------------------------


async def filled_store(path: Path) -> None:
    """A store with enough call records that the calls table has pages of its own, closed (so
    every page is in the main file, none in the -wal file)."""
    store = Store(path)
    await store.open()
    await store.save_calls(
        [
            doc(f"c{n}", f"2026-01-01T00:00:{n % 60:02d}.000Z", status="ended", pad="x" * 400)
            for n in range(300)
        ]
    )
    await store.aclose()


def corrupt_calls_table(path: Path) -> None:
    """Overwrites the header of the calls table's root page, as a bad disk sector would."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'calls'").fetchone()[0]
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
    with path.open("r+b") as file:
        file.seek((root - 1) * page_size)
        file.write(b"\xff" * 16)


async def refusal(path: Path) -> str:
    """Why a store on ``path`` refuses to open."""
    store = Store(path)
    with pytest.raises(StoreError) as refused:
        await store.open()
    await store.aclose()
    return str(refused.value)


async def test_a_damaged_file_is_refused_at_open_saying_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    await filled_store(path)
    corrupt_calls_table(path)
    message = await refusal(path)
    assert f"the store {path} is damaged" in message and "restore it from a backup" in message
    assert ".recover" in message and ("btreeInitPage" in message or "malformed" in message)


async def test_damage_found_while_running_makes_health_say_damaged(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    await filled_store(path)
    store = Store(path, integrity_check_interval_s=0)
    await store.open()
    try:
        assert await store.health() == StoreHealth("ok")
        corrupt_calls_table(path)
        health = await store.health()
        assert health.state == "damaged" and health.detail and str(path) in health.detail
        assert (await store.health()).state == "damaged"  # until a restart
    finally:
        await store.aclose()


async def test_a_read_that_meets_damage_makes_health_say_damaged_at_once(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    await filled_store(path)
    store = Store(path)  # the default interval: no integrity check is due for an hour
    await store.open()
    try:
        corrupt_calls_table(path)
        # Another connection's commit makes the store drop its page cache and read the file.
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("INSERT INTO meta (key, value) VALUES ('elsewhere', 'x')")
        with pytest.raises(StoreError, match="malformed"):
            await store.list_calls(ListQuery())
        health = await store.health()
        assert health.state == "damaged" and "restore it from a backup" in (health.detail or "")
    finally:
        await store.aclose()


def read_only_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every connection the store opens is read-only (``mode=ro``), as with a read-only file or
    mount. chmod cannot show this when the tests run as root, who may write any file."""
    connect = sqlite3.connect

    def read_only(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        if isinstance(database, Path):
            kwargs["uri"] = True
            database = f"{database.resolve().as_uri()}?mode=ro"
        return connect(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", read_only)


async def test_a_read_only_file_is_refused_at_open_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.sqlite3"
    await filled_store(path)
    read_only_connect(monkeypatch)
    message = await refusal(path)
    assert f"the store {path} is read-only" in message and "writable by sipbridge's user" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes a file whatever its mode")
async def test_a_file_without_write_permission_is_refused_as_read_only(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    await filled_store(path)
    path.chmod(0o444)
    assert "is read-only" in await refusal(path)


async def test_a_write_refused_while_running_makes_health_say_read_only(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = Store(path)
    await store.open()
    try:
        writable = store._db
        assert writable is not None
        # The filesystem turning read-only under a running store (a remount after I/O errors).
        store._db = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
            check_same_thread=False,
        )  # fmt: skip
        with pytest.raises(StoreError, match="readonly"):
            await store.insert("assistant", doc("a1", "2026-01-01T00:00:00.000Z"))
        health = await store.health()
        assert health.state == "read-only" and "writable" in (health.detail or "")
        store._db.close()
        store._db = writable
        await store.insert("assistant", doc("a1", "2026-01-01T00:00:00.000Z"))
        assert await store.health() == StoreHealth("ok")
    finally:
        await store.aclose()


# ---- one sipbridge per file ------------------------------------------------------------------------


async def test_a_second_store_on_the_same_file_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.sqlite3"
    first = Store(path)
    await first.open()
    try:
        message = await refusal(path)
        assert f"another sipbridge (pid {os.getpid()}) is using the store {path}" in message
        assert f"{path}.lock" in message and "store.path of its own" in message
    finally:
        await first.aclose()
    second = Store(path)
    await second.open()  # the lock went with the first store
    await second.aclose()
