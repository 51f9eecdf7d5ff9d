"""The embedded store: one SQLite file holding assistants, phone numbers and call records.

Resources are kept as their JSON documents, with the columns needed to find and order them.
All SQLite work happens on one dedicated thread that owns the connection, so the event loop never
waits on disk; every method is a coroutine that hands its work to that thread. The schema is
versioned with ``PRAGMA user_version`` and upgraded by :data:`MIGRATIONS` on open.

A damaged or read-only file is refused at open, with a message naming the file and what to do;
:meth:`Store.health` says the same while running (see :class:`StoreHealth`). One sipbridge at a
time uses a file: a second one is refused (see :class:`StoreLock`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import operator
import os
import secrets
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from bridge.errors import Conflict, StoreError
from bridge.models import parse_sip_uri, sip_uri_key

log = logging.getLogger(__name__)

T = TypeVar("T")
Kind = Literal["assistant", "phone_number"]
StoreState = Literal["ok", "unavailable", "damaged", "read-only"]

# PRAGMA quick_check reads every page of the file (it skips integrity_check's comparison of each
# index with its table): on a store of 100,000 call records (421 MB) it took 0.33 s with the file
# in the page cache and 4.8 s from disk, on a 2-core VM. So it runs once at open, and /health
# runs it at most this often, on a connection of its own that store work does not wait for.
INTEGRITY_CHECK_INTERVAL_S = 3600.0
# SQLite's primary result codes (sqlite.org/rescode.html) that mean the file itself is bad.
_DAMAGED_CODES = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})
_TABLES: dict[Kind, str] = {"assistant": "assistants", "phone_number": "phone_numbers"}

# Each entry upgrades the schema by one version; never edit a released entry, append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE assistants (
        id TEXT PRIMARY KEY,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        doc TEXT NOT NULL
    );
    CREATE INDEX assistants_created ON assistants (created_at);
    CREATE TABLE phone_numbers (
        id TEXT PRIMARY KEY,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        sip_uri_key TEXT NOT NULL UNIQUE,
        sip_user TEXT NOT NULL,
        doc TEXT NOT NULL
    );
    CREATE INDEX phone_numbers_user ON phone_numbers (sip_user);
    CREATE INDEX phone_numbers_created ON phone_numbers (created_at);
    CREATE TABLE calls (
        id TEXT PRIMARY KEY,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        status TEXT NOT NULL,
        phone_number_id TEXT,
        assistant_id TEXT,
        ended_reason TEXT,
        doc TEXT NOT NULL
    );
    CREATE INDEX calls_created ON calls (created_at);
    CREATE INDEX calls_status ON calls (status);
    """,
)


@dataclass(frozen=True)
class ListQuery:
    """Vapi's list filters: ``limit`` and the createdAt/updatedAt bounds (ISO strings, UTC)."""

    limit: int = 100
    created_gt: str | None = None
    created_lt: str | None = None
    created_ge: str | None = None
    created_le: str | None = None
    updated_gt: str | None = None
    updated_lt: str | None = None
    updated_ge: str | None = None
    updated_le: str | None = None

    def admits(self, document: dict[str, Any]) -> bool:
        """Whether a document's createdAt/updatedAt fall inside the bounds (as :meth:`where`)."""
        checks: tuple[tuple[str, str | None, Callable[[str, str], bool]], ...] = (
            ("createdAt", self.created_gt, operator.gt),
            ("createdAt", self.created_lt, operator.lt),
            ("createdAt", self.created_ge, operator.ge),
            ("createdAt", self.created_le, operator.le),
            ("updatedAt", self.updated_gt, operator.gt),
            ("updatedAt", self.updated_lt, operator.lt),
            ("updatedAt", self.updated_ge, operator.ge),
            ("updatedAt", self.updated_le, operator.le),
        )
        return all(bound is None or test(str(document[key]), bound) for key, bound, test in checks)

    def where(self) -> tuple[str, list[Any]]:
        """SQL conditions and their parameters."""
        clauses: list[str] = []
        params: list[Any] = []
        for column, op, value in (
            ("created_at", ">", self.created_gt),
            ("created_at", "<", self.created_lt),
            ("created_at", ">=", self.created_ge),
            ("created_at", "<=", self.created_le),
            ("updated_at", ">", self.updated_gt),
            ("updated_at", "<", self.updated_lt),
            ("updated_at", ">=", self.updated_ge),
            ("updated_at", "<=", self.updated_le),
        ):
            if value is not None:
                clauses.append(f"{column} {op} ?")
                params.append(value)
        return " AND ".join(clauses), params


@dataclass(frozen=True)
class StoreHealth:
    """What /health says about the store.

    Attributes:
        state: ``ok``; ``unavailable`` (not open, or a read failed for another reason);
            ``damaged`` (SQLite found a corrupt page: restore from a backup and restart);
            ``read-only`` (a write was refused: the file, its directory or the filesystem).
        detail: what SQLite said, for the operator.
    """

    state: StoreState
    detail: str | None = None


def _primary_code(exc: sqlite3.Error) -> str:
    """``SQLITE_CORRUPT`` for ``SQLITE_CORRUPT_INDEX`` and the like; empty when unknown."""
    name = str(getattr(exc, "sqlite_errorname", "") or "")
    return "_".join(name.split("_")[:2])


def damaged_message(path: Path, detail: str) -> str:
    """What to tell an operator about a damaged store file."""
    return (
        f"the store {path} is damaged ({detail}); restore it from a backup, or move it and its "
        f"-wal and -shm files aside to start with an empty store (`sqlite3 {path} .recover` "
        "can save what is still readable)"
    )


def read_only_message(path: Path, detail: str) -> str:
    """What to tell an operator about a store that cannot be written."""
    return (
        f"the store {path} is read-only ({detail}); sipbridge writes call records there: make "
        "the file, its directory and its -wal and -shm files writable by sipbridge's user, on a "
        "filesystem mounted read-write"
    )


def _integrity_problem(db: sqlite3.Connection) -> str | None:
    """What ``PRAGMA quick_check`` finds wrong with the file, or None when it says ``ok``.

    Raises:
        sqlite3.Error: other than damage (damage is returned: SQLite reports a corrupt page as
            rows of text or, for some pages, as the query's own SQLITE_CORRUPT error).
    """
    try:
        rows = db.execute("PRAGMA quick_check").fetchall()
    except sqlite3.DatabaseError as exc:
        if _primary_code(exc) in _DAMAGED_CODES:
            return str(exc)
        raise
    if rows == [("ok",)]:
        return None
    return "; ".join(str(row[0]) for row in rows[:3]).replace("\n", " ")


def _dumps(document: dict[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


class StoreLock:
    """An exclusive advisory lock on a sidecar file (``<store>.lock``) for one sipbridge.

    Two sipbridge processes on one SQLite file would each settle the other's live calls as left
    over from a crash at start, and both answer the same PBX. ``flock`` locks belong to the
    open file, so the kernel releases this one when the process ends however it ends (a
    ``kill -9`` leaves no stale lock), and a second open in the same process is refused too.
    The holder's pid is written into the file for the refusal message. SQLite-only: a shared
    database server (several instances on one PostgreSQL) will not take this lock.
    """

    def __init__(self, store_path: Path) -> None:
        self.store_path = store_path
        self.path = store_path.with_name(store_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock.

        Raises:
            StoreError: another process (or store object) holds it, or it cannot be created.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise StoreError(read_only_message(self.path, str(exc))) from exc
            raise StoreError(f"cannot create the store's lock file {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StoreError(f"cannot lock {self.path}: {exc}") from exc
            raise StoreError(
                f"another sipbridge{f' (pid {holder})' if holder else ''} is using the store "
                f"{self.store_path}: it holds {self.path}. Stop it first, or give this "
                "one a store.path of its own"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Lets the lock go (closing the file releases it); a second call does nothing."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Store:
    """SQLite-backed persistence. Use ``await store.open()`` first and ``await store.aclose()``."""

    def __init__(
        self,
        path: Path,
        busy_timeout_s: float = 5.0,
        integrity_check_interval_s: float = INTEGRITY_CHECK_INTERVAL_S,
    ) -> None:
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        self._integrity_check_interval_s = integrity_check_interval_s
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._lock = StoreLock(path)
        # Damage stays until a restart; read-only clears with the next write that succeeds.
        self._problem: StoreHealth | None = None
        self._checked_at: float | None = None  # time.monotonic() of the last integrity check

    # ---- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Opens (creating if needed) the database and applies pending migrations.

        Raises:
            StoreError: the file cannot be opened or migrated.
        """
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sipbridge-store")
        await self._run(self._open_sync, "open")

    async def aclose(self) -> None:
        """Closes the connection and stops the store thread."""
        if self._executor is None:
            return
        try:
            await self._run(self._close_sync, "close")
        finally:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _open_sync(self) -> None:
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            self._connect()
        except BaseException:
            self._lock.release()
            raise

    def _connect(self) -> None:
        db = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None)
        try:
            self._prepare(db)
        except sqlite3.Error as exc:
            db.close()
            code = _primary_code(exc)
            if code in _DAMAGED_CODES:
                raise StoreError(damaged_message(self.path, str(exc))) from exc
            if code == "SQLITE_READONLY":
                raise StoreError(read_only_message(self.path, str(exc))) from exc
            raise StoreError(f"cannot open the store {self.path}: {exc}") from exc
        except BaseException:
            db.close()
            raise
        self._db = db
        self._checked_at = time.monotonic()

    def _prepare(self, db: sqlite3.Connection) -> None:
        # Before anything writes to it: a file with corrupt pages passes every other step here
        # (the damage shows when a query reaches the page), then fails reads and takes writes.
        problem = _integrity_problem(db)
        if problem is not None:
            raise StoreError(damaged_message(self.path, problem))
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this sipbridge "
                f"({len(MIGRATIONS)}); upgrade sipbridge"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            log.info("migrating %s to schema version %d", self.path, number)
            db.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
        if db.execute("SELECT value FROM meta WHERE key = 'org_id'").fetchone() is None:
            db.execute("INSERT INTO meta (key, value) VALUES ('org_id', ?)", (str(uuid.uuid4()),))
        # A file that can be read but not written (its mode, a read-only mount) opens without a
        # word and fails at the first call record: find out now with a write that is rolled back.
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("UPDATE meta SET value = value WHERE key = 'org_id'")
        finally:
            db.execute("ROLLBACK")

    def _close_sync(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._lock.release()

    async def _run(self, func: Callable[[], T], operation: str, *, write: bool = False) -> T:
        if self._executor is None:
            raise StoreError(f"store is not open ({operation})")
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, func)
        except (Conflict, StoreError):
            raise
        except sqlite3.Error as exc:
            self._note_failure(exc)
            raise StoreError(f"{operation} failed: {exc}") from exc
        if write and self._problem is not None and self._problem.state == "read-only":
            self._problem = None
        return result

    def _note_failure(self, exc: sqlite3.Error) -> None:
        """Remembers a failure that /health must report until it is repaired."""
        code = _primary_code(exc)
        if code in _DAMAGED_CODES:
            self._problem = StoreHealth("damaged", damaged_message(self.path, str(exc)))
        elif code == "SQLITE_READONLY" and self._problem is None:
            self._problem = StoreHealth("read-only", read_only_message(self.path, str(exc)))

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    # ---- meta ---------------------------------------------------------------------------------

    async def org_id(self) -> str:
        """The organisation id created with the database."""

        def read() -> str:
            row = self._conn().execute("SELECT value FROM meta WHERE key = 'org_id'").fetchone()
            return str(row[0])

        return await self._run(read, "org_id")

    async def recording_url_secret(self) -> str:
        """The key that signs recording links, created on first use and kept (never logged)."""

        def read_or_create() -> str:
            db = self._conn()
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('recording_url_secret', ?)",
                (secrets.token_hex(32),),
            )
            row = db.execute("SELECT value FROM meta WHERE key = 'recording_url_secret'").fetchone()
            return str(row[0])

        return await self._run(read_or_create, "recording_url_secret", write=True)

    async def health(self) -> StoreHealth:
        """For /health: a real read of each table, and now and then the integrity check.

        The read reaches the tables' root pages (cheap, on every call). ``PRAGMA quick_check``
        reads every page (see :data:`INTEGRITY_CHECK_INTERVAL_S` for its cost), so it runs at
        most once per interval, on a read-only connection of its own: WAL lets it read while
        the store thread goes on writing. A failure of any store operation that shows damage
        or a read-only file is reported too, from the moment it happens.
        """

        def read() -> None:
            db = self._conn()
            db.execute("SELECT value FROM meta WHERE key = 'org_id'").fetchone()
            for table in ("assistants", "phone_numbers", "calls"):
                db.execute(f"SELECT doc FROM {table} ORDER BY created_at DESC LIMIT 1").fetchone()

        try:
            await self._run(read, "health")
        except StoreError as exc:
            return self._problem or StoreHealth("unavailable", str(exc))
        now = time.monotonic()
        if self._problem is None and (
            self._checked_at is None or now - self._checked_at >= self._integrity_check_interval_s
        ):
            self._checked_at = now  # concurrent requests do not start a second check
            problem = await asyncio.to_thread(self._check_integrity)
            if problem is not None:
                self._problem = StoreHealth("damaged", damaged_message(self.path, problem))
        return self._problem or StoreHealth("ok")

    def _check_integrity(self) -> str | None:
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        try:
            with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
                return _integrity_problem(db)
        except sqlite3.Error as exc:
            return str(exc) if _primary_code(exc) in _DAMAGED_CODES else None

    # ---- assistants and phone numbers ---------------------------------------------------------

    async def insert(self, kind: Kind, document: dict[str, Any]) -> None:
        """Adds a new resource (``id``, ``createdAt``, ``updatedAt`` already set).

        Raises:
            Conflict: a phone number with the same SIP URI exists.
        """
        await self._run(
            lambda: self._write(kind, document, insert=True), f"insert {kind}", write=True
        )

    async def replace(self, kind: Kind, document: dict[str, Any]) -> bool:
        """Stores a new version of a resource; False if it no longer exists.

        Raises:
            Conflict: a phone number with the same SIP URI exists.
        """
        return await self._run(
            lambda: self._write(kind, document, insert=False), f"update {kind}", write=True
        )

    def _write(self, kind: Kind, document: dict[str, Any], *, insert: bool) -> bool:
        db = self._conn()
        table = _TABLES[kind]
        values: dict[str, Any] = {
            "id": document["id"],
            "created_at": document["createdAt"],
            "updated_at": document["updatedAt"],
            "doc": _dumps(document),
        }
        if kind == "phone_number":
            uri = str(document["sipUri"])
            parsed = parse_sip_uri(uri)
            values["sip_uri_key"] = sip_uri_key(uri)
            values["sip_user"] = parsed[0].lower() if parsed else uri.lower()
        try:
            if insert:
                columns = ", ".join(values)
                marks = ", ".join("?" for _ in values)
                db.execute(
                    f"INSERT INTO {table} ({columns}) VALUES ({marks})", list(values.values())
                )
                return True
            assignments = ", ".join(f"{c} = ?" for c in values if c != "id")
            params = [v for c, v in values.items() if c != "id"] + [values["id"]]
            cursor = db.execute(f"UPDATE {table} SET {assignments} WHERE id = ?", params)
            return cursor.rowcount == 1
        except sqlite3.IntegrityError as exc:
            if kind == "phone_number" and "sip_uri_key" in str(exc):
                row = db.execute(
                    "SELECT id FROM phone_numbers WHERE sip_uri_key = ?", (values["sip_uri_key"],)
                ).fetchone()
                owner = row[0] if row else "?"
                raise Conflict(
                    [f"sipUri: {document['sipUri']} is already used by phone number {owner}"]
                ) from exc
            raise

    async def get(self, kind: Kind, resource_id: str) -> dict[str, Any] | None:
        """One resource's document, or None."""

        def read() -> dict[str, Any] | None:
            row = (
                self._conn()
                .execute(
                    f"SELECT doc FROM {_TABLES[kind]} WHERE id = ?",
                    (resource_id,),
                )
                .fetchone()
            )
            return json.loads(row[0]) if row else None

        return await self._run(read, f"get {kind}")

    async def delete(self, kind: Kind, resource_id: str) -> dict[str, Any] | None:
        """Removes a resource; returns its last document, or None if there was none."""

        def remove() -> dict[str, Any] | None:
            db = self._conn()
            row = db.execute(
                f"DELETE FROM {_TABLES[kind]} WHERE id = ? RETURNING doc",
                (resource_id,),
            ).fetchone()
            return json.loads(row[0]) if row else None

        return await self._run(remove, f"delete {kind}", write=True)

    async def listing(self, kind: Kind, query: ListQuery) -> list[dict[str, Any]]:
        """Resources newest first, filtered as Vapi's list endpoints filter them."""

        def read() -> list[dict[str, Any]]:
            where, params = query.where()
            sql = f"SELECT doc FROM {_TABLES[kind]}"
            if where:
                sql += f" WHERE {where}"
            sql += " ORDER BY created_at DESC, id LIMIT ?"
            rows = self._conn().execute(sql, [*params, query.limit]).fetchall()
            return [json.loads(r[0]) for r in rows]

        return await self._run(read, f"list {kind}")

    async def phone_numbers_for_user(self, user: str) -> list[dict[str, Any]]:
        """Phone numbers whose SIP URI user part equals ``user`` (case-insensitively)."""

        def read() -> list[dict[str, Any]]:
            rows = (
                self._conn()
                .execute(
                    "SELECT doc FROM phone_numbers WHERE sip_user = ? ORDER BY created_at",
                    (user.lower(),),
                )
                .fetchall()
            )
            return [json.loads(r[0]) for r in rows]

        return await self._run(read, "find phone number")

    async def phone_numbers_with_assistant(self, assistant_id: str) -> list[str]:
        """Ids of the phone numbers whose assistantId is ``assistant_id``."""

        def read() -> list[str]:
            rows = (
                self._conn()
                .execute(
                    "SELECT id FROM phone_numbers WHERE json_extract(doc, '$.assistantId') = ?",
                    (assistant_id,),
                )
                .fetchall()
            )
            return [str(r[0]) for r in rows]

        return await self._run(read, "find phone numbers by assistant")

    # ---- call records -------------------------------------------------------------------------

    async def save_calls(self, documents: Sequence[dict[str, Any]]) -> None:
        """Inserts or updates call records (Vapi ``Call`` objects) in one transaction."""

        def write() -> None:
            db = self._conn()
            rows = [
                (
                    d["id"],
                    d["createdAt"],
                    d["updatedAt"],
                    d["status"],
                    d.get("phoneNumberId"),
                    d.get("assistantId"),
                    d.get("endedReason"),
                    _dumps(d),
                )
                for d in documents
            ]
            db.execute("BEGIN")
            try:
                db.executemany(
                    """INSERT INTO calls (id, created_at, updated_at, status, phone_number_id,
                                          assistant_id, ended_reason, doc)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT (id) DO UPDATE SET
                         updated_at = excluded.updated_at, status = excluded.status,
                         phone_number_id = excluded.phone_number_id,
                         assistant_id = excluded.assistant_id,
                         ended_reason = excluded.ended_reason, doc = excluded.doc""",
                    rows,
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._run(write, "save calls", write=True)

    async def get_call(self, call_id: str) -> dict[str, Any] | None:
        """One call record, or None."""

        def read() -> dict[str, Any] | None:
            row = self._conn().execute("SELECT doc FROM calls WHERE id = ?", (call_id,)).fetchone()
            return json.loads(row[0]) if row else None

        return await self._run(read, "get call")

    async def delete_call(self, call_id: str) -> bool:
        """Removes a call record; False if there was none."""

        def remove() -> bool:
            cursor = self._conn().execute("DELETE FROM calls WHERE id = ?", (call_id,))
            return cursor.rowcount > 0

        return await self._run(remove, "delete call", write=True)

    async def list_calls(
        self,
        query: ListQuery,
        *,
        statuses: Sequence[str] = (),
        phone_number_id: str | None = None,
        assistant_id: str | None = None,
        call_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Call records newest first."""

        def read() -> list[dict[str, Any]]:
            where, params = query.where()
            clauses = [where] if where else []
            if statuses:
                clauses.append(f"status IN ({', '.join('?' for _ in statuses)})")
                params.extend(statuses)
            if phone_number_id:
                clauses.append("phone_number_id = ?")
                params.append(phone_number_id)
            if assistant_id:
                clauses.append("assistant_id = ?")
                params.append(assistant_id)
            if call_id is not None:
                clauses.append("id = ?")
                params.append(call_id)
            sql = "SELECT doc FROM calls"
            if clauses:
                sql += " WHERE " + " AND ".join(clauses)
            sql += " ORDER BY created_at DESC, id LIMIT ?"
            rows = self._conn().execute(sql, [*params, query.limit]).fetchall()
            return [json.loads(r[0]) for r in rows]

        return await self._run(read, "list calls")
