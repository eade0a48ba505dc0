"""SQLite backend: the pure store in memory, with every change committed to a file first.

Reads are served from memory. Each batch's changes are written in one transaction on a
single writer thread (so the event loop never waits on the disk), and `execute` returns
only after that commit: a reply, and the acknowledgement after it, always follow the commit.
A batch that only refreshed TTLs (gets, loads) does not wait for its write.

Deadlines are kept as wall-clock times in the file, so TTL keeps counting while the worker
is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack

from worker.backend_url import parse_backend_url
from worker.backends.memory import MemoryBackend
from worker.errors import ConfigError
from worker.protocol import Event, Trimmed
from worker.store import NO_DEADLINE, Convo, Limits

SCHEMA = """
CREATE TABLE IF NOT EXISTS convos (
    name  TEXT PRIMARY KEY,
    seq   INTEGER NOT NULL,
    turns BLOB NOT NULL,
    state BLOB,  -- files of before: their state, moved to keys when opened
    ids   BLOB,
    used  REAL NOT NULL,  -- wall-clock time of the last use: the TTL runs from it
    tick  INTEGER NOT NULL  -- order of last use, for LRU (times can tie)
);
-- A conversation's state, a row a key: SQLite writes a row whole, so a write to the
-- conversation (an append) does not write its state again, nor a save the other keys.
CREATE TABLE IF NOT EXISTS keys (
    name     TEXT NOT NULL,
    ns       TEXT NOT NULL,
    key      TEXT NOT NULL,
    value    BLOB NOT NULL,  -- msgpack, as saved
    deadline REAL,  -- wall clock; NULL: none
    PRIMARY KEY (name, ns, key)
);
-- What stays of a conversation a request deleted, or evicted for room, while its ids matter:
-- its ids and the delete's (store.Grave).
CREATE TABLE IF NOT EXISTS graves (
    name TEXT PRIMARY KEY,
    ids  BLOB NOT NULL,
    dug  REAL NOT NULL  -- wall-clock time of the delete or last use: the TTL runs from it
);
-- Trimmed events stored with their trim, until the broker has them (Backend.delivered):
-- msgpack [convo, count, turns, summary_upto, ts, born]. A worker killed in between sends
-- them again at its next start (a summarizer skips turns its summary covers).
CREATE TABLE IF NOT EXISTS outbox (
    n     INTEGER PRIMARY KEY,  -- the event's receipt
    event BLOB NOT NULL
);
"""
# Files made before summaries existed get their columns when opened.
NEW_COLUMNS = {
    "summary": "ALTER TABLE convos ADD COLUMN summary BLOB",  # msgpack [text, upto, tokens]
    "born": "ALTER TABLE convos ADD COLUMN born INTEGER NOT NULL DEFAULT 0",  # Unix ms
}
UPSERT = """
INSERT INTO convos(name, seq, turns, state, ids, summary, born, used, tick)
VALUES (?, ?, ?, NULL, ?, ?, ?, 0, 0)
ON CONFLICT(name) DO UPDATE SET
    seq = excluded.seq, turns = excluded.turns, ids = excluded.ids,
    summary = excluded.summary, born = excluded.born
"""
UPSERT_KEY = """
INSERT INTO keys(name, ns, key, value, deadline) VALUES (?, ?, ?, ?, ?)
ON CONFLICT(name, ns, key) DO UPDATE SET value = excluded.value, deadline = excluded.deadline
"""


log = logging.getLogger("memory_worker.sqlite")
# Free space a rebuild of a table asks for, in sizes of the file and its WAL: the new table
# is written to the WAL, then into the file, and the old one's pages stay free in it (a
# review filled a disk with 2.7 times; 3.3 was enough).
REBUILD_ROOM = 4
# A conversation's keys as stored: ns -> key -> (msgpack value, wall-clock deadline or None)
_Keys = dict[str, dict[str, tuple[bytes, float | None]]]


def _move_state_to_keys(db: sqlite3.Connection) -> None:
    """Files of before kept a conversation's state in one column: moved to `keys`, once,
    and keys left by a conversation that is gone are dropped."""
    old = db.execute("SELECT name, state FROM convos WHERE state IS NOT NULL").fetchall()
    with db:
        db.execute("BEGIN IMMEDIATE")
        if old:
            db.executemany(
                UPSERT_KEY,
                [
                    (name, ns, key, value, deadline)
                    for name, state in old
                    for ns, entries in msgpack.unpackb(state).items()
                    for key, (value, deadline) in entries.items()
                ],
            )
            db.execute("UPDATE convos SET state = NULL WHERE state IS NOT NULL")
        db.execute("DELETE FROM keys WHERE name NOT IN (SELECT name FROM convos)")


def _with_rowid(db: sqlite3.Connection, path: Path) -> None:
    """Files of before made `convos` and `graves` WITHOUT ROWID tables, which keep each row
    whole in its key's B-tree: that suits rows of a few dozen bytes (SQLite's advice), and a
    conversation's window or a grave's ids are a kilobyte or more. A commit of a batch took
    twice as long (docs/performance.md). Rebuilt once as rowid tables, in one transaction.

    Only a speed-up: a table stays as it is, and works, where the rebuild could cost more
    than time. Without REBUILD_ROOM times the file's size free on its disk (the copy goes
    through the WAL and then into the file: a disk filled there stopped the worker for
    good), with views, triggers or indexes of the user's on it (a DROP loses them), or when
    SQLite refuses it; the WAL it grew is given back."""
    for table in ("convos", "graves"):
        (sql,) = db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).fetchone()
        without = re.search(r"\)\s*WITHOUT\s+ROWID\s*$", sql, re.IGNORECASE)
        if without is None:
            continue
        named = re.match(rf"\s*CREATE\s+TABLE\s+([\"`\[]?){table}[\"`\]]?\s*\(", sql, re.I)
        why = (
            "its CREATE statement is not ours" if named is None else _rebuild_harm(db, table, path)
        )
        if why is None and named is not None:
            columns = ", ".join(row[1] for row in db.execute(f"PRAGMA table_info({table})"))
            create = "CREATE TABLE rebuilt (" + sql[named.end() : without.start()] + ")"
            try:
                with db:
                    db.execute("BEGIN IMMEDIATE")
                    db.execute(create)
                    db.execute(f"INSERT INTO rebuilt({columns}) SELECT {columns} FROM {table}")
                    db.execute(f"DROP TABLE {table}")
                    db.execute(f"ALTER TABLE rebuilt RENAME TO {table}")
            except sqlite3.Error as exc:
                why = f"SQLite refused it: {exc}"
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if why is None:
            log.info("sqlite: %s rebuilt as a rowid table (once: faster commits)", table)
        else:
            log.warning(
                "sqlite: %s kept as it is, a WITHOUT ROWID table (rebuilt as a rowid table, "
                "its commits would take half the time): %s",
                table,
                why,
            )


def _rebuild_harm(db: sqlite3.Connection, table: str, path: Path) -> str | None:
    """What a rebuild of `table` would cost beyond time (None: nothing): objects of the
    user's on it that a DROP loses, or a disk without REBUILD_ROOM times the file's size free
    (measured beside the file a link names: SQLite's WAL is there)."""
    others = db.execute(
        "SELECT type, name FROM sqlite_master WHERE name != ? AND sql LIKE ?",
        (table, f"%{table}%"),
    ).fetchall()
    if others:
        return f"{', '.join(f'{kind} {name}' for kind, name in others)} would be lost"
    real = path.resolve()
    size = sum(os.stat(f).st_size for f in (real, Path(f"{real}-wal")) if os.path.exists(f))
    free = shutil.disk_usage(real.parent).free
    if free < REBUILD_ROOM * size:
        return (
            f"it needs {REBUILD_ROOM * size >> 20} MiB free beside the file, {free >> 20} MiB are"
        )
    return None


def _log_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("sqlite: a write of TTLs or sent events failed: %s", fut.exception())


def parse_url(url: str) -> tuple[Path, str]:
    """(path, synchronous mode) of sqlite:///relative.db or sqlite:////absolute.db."""
    try:
        parsed = parse_backend_url(url)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if parsed.kind != "sqlite":
        raise ConfigError(f"--backend {url!r}: expected sqlite:///relative.db")
    return parsed.path, parsed.synchronous


class SqliteBackend(MemoryBackend):
    """Memory-speed reads, and every acknowledged change in a WAL-mode SQLite file.

    Args:
        url: sqlite:///relative.db or sqlite:////absolute.db; `?synchronous=normal` trades
            durability on power loss (not on a crash of the worker) for speed.
        limits: the store's bounds.
        clock, wall: monotonic and Unix clocks (tests pass fakes).
    """

    name = "sqlite"

    def __init__(
        self,
        url: str,
        limits: Limits,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.path, self.synchronous = parse_url(url)
        super().__init__(limits, clock=clock, wall=wall)
        self.store.dirty = set()
        self._clock = clock
        self._wall = wall
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        self._db: sqlite3.Connection | None = None
        self._lock: int | None = None  # the open <file>.lock this worker holds
        self._lazy: asyncio.Future[None] | None = None
        self._tick = 0
        self._receipt = 0  # the last trimmed event's number in the outbox
        self._unsent: list[Event] = []  # kept in the outbox, and made by opening
        self._outbox: list[tuple[int, bytes]] = []  # trimmed events not written yet
        self._delivered: list[tuple[int]] = []  # the broker has them: their rows go

    # --- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        rows, keys, graves, outbox = await loop.run_in_executor(self._writer, self._connect)
        self._unsent = [_unpack_trimmed(n, event) for n, event in outbox]
        for row in rows:
            self._restore(row, keys.get(row[0], {}))
        to_mono = self._clock() - self._wall()
        for name, ids, dug in graves:
            self.store.restore_grave(name, _ids(ids), dug + to_mono)
        self.store.enforce_bounds()  # the limits may be lower than when these were stored
        self.store.touched.clear()
        await self._commit()
        # What opening evicted or trimmed, stored now, goes out with what the outbox kept.
        self._unsent += self.store.take_events()

    def _take(self) -> None:
        """Hold `<file>.lock` while open: two workers on one file would both answer and
        number turns, and each would lose what the other acknowledged (the kernel releases
        it when the process dies). Named from the file's real path, links resolved."""
        name = f"{self.path.resolve()}.lock"
        try:
            lock = os.open(name, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:  # left by a run as another user (root): locking needs no write
            lock = os.open(name, os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(lock, 32).decode(errors="replace").strip()
            os.close(lock)
            raise ConfigError(
                f"--backend sqlite: {self.path} is in use by another memory-worker"
                + (f" (pid {holder})" if holder else "")
                + ": one worker per SQLite file; workers that share a store share Redis"
                " (docs/scaling.md)"
            ) from None
        self._lock = lock
        with contextlib.suppress(OSError):  # the pid only helps the message above
            os.ftruncate(lock, 0)
            os.write(lock, f"{os.getpid()}\n".encode())

    def _release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            os.close(lock)

    def _connect(
        self,
    ) -> tuple[
        list[tuple[Any, ...]],
        dict[str, _Keys],
        list[tuple[str, bytes, float]],
        list[tuple[int, bytes]],
    ]:
        db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._take()
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            db.executescript(SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(convos)")}
            for column, add in NEW_COLUMNS.items():
                if column not in columns:
                    db.execute(add)
            _with_rowid(db, self.path)
            _move_state_to_keys(db)
            rows = db.execute(
                "SELECT name, seq, turns, ids, summary, born, used FROM convos ORDER BY tick"
            ).fetchall()
            keys: dict[str, _Keys] = {}
            for name, ns, key, value, deadline in db.execute(
                "SELECT name, ns, key, value, deadline FROM keys"
            ):
                keys.setdefault(name, {}).setdefault(ns, {})[key] = (value, deadline)
            graves = db.execute("SELECT name, ids, dug FROM graves ORDER BY dug").fetchall()
            outbox = db.execute("SELECT n, event FROM outbox ORDER BY n").fetchall()
            self._receipt = outbox[-1][0] if outbox else 0
            self._tick = db.execute("SELECT coalesce(max(tick), 0) FROM convos").fetchone()[0]
        except (OSError, sqlite3.Error) as exc:
            if db is not None:
                db.close()
            self._release()
            raise ConfigError(f"--backend sqlite: cannot open {self.path}: {exc}") from None
        self._db = db
        return rows, keys, graves, outbox

    def held_events(self) -> list[Event]:
        unsent, self._unsent = self._unsent, []
        return unsent

    def delivered(self, receipt: int) -> None:
        self._delivered.append((receipt,))

    async def close(self) -> None:
        if self._lazy is not None:
            await asyncio.shield(self._lazy)
        if self._db is not None and self._delivered:
            delivered, self._delivered = self._delivered, []
            await asyncio.get_running_loop().run_in_executor(
                self._writer, self._write, [], [], ([], [], []), ([], []), [], [], delivered
            )
        db, self._db = self._db, None
        if db is not None:
            await asyncio.get_running_loop().run_in_executor(self._writer, db.close)
        self._writer.shutdown(wait=True)
        self._release()

    # --- writing ----------------------------------------------------------------------------

    async def _commit(self) -> None:
        store = self.store
        assert store.dirty is not None
        dirty, touched = store.dirty, store.touched
        for event in store.events:
            if isinstance(event, Trimmed) and not event.receipt:
                self._receipt += 1
                event.receipt = self._receipt
                self._outbox.append((event.receipt, _pack_trimmed(event)))
        outbox, delivered = self._outbox, self._delivered
        if not dirty and not touched and not store.graves_dirty and not outbox and not delivered:
            return
        self._outbox, self._delivered = [], []
        keys_dirty, cleared, buried = store.keys_dirty, store.keys_cleared, store.graves_dirty
        store.dirty, store.touched = set(), {}
        store.keys_dirty, store.keys_cleared, store.graves_dirty = set(), set(), set()
        upserts, deletes = [], []
        for name in dirty:
            cv = store.get_convo(name)
            if cv is None:
                deletes.append((name,))
            else:
                upserts.append(self._row(name, cv))
        keys = self._keys(keys_dirty, cleared)
        graves = self._graves(buried)
        now = self._wall()
        used = []
        for name in touched:
            if name in store:
                self._tick += 1
                used.append((now, self._tick, name))
        loop = asyncio.get_running_loop()
        write = loop.run_in_executor(
            self._writer, self._write, upserts, deletes, keys, graves, used, outbox, delivered
        )
        if upserts or deletes or buried or outbox:
            try:
                await write
            except BaseException:  # written again with the next batch
                store.dirty |= dirty
                store.keys_dirty |= keys_dirty
                store.keys_cleared |= cleared
                store.graves_dirty |= buried
                self._outbox[:0] = outbox
                self._delivered[:0] = delivered
                raise
        else:
            # TTL refreshes and delivered events only: no reply promises them, so nothing
            # waits on the disk (an event whose row a failure left is sent again).
            write.add_done_callback(_log_failure)
            self._lazy = write

    def _keys(
        self, dirty: set[tuple[str, str, str]], cleared: set[str]
    ) -> tuple[list[tuple[str]], list[tuple[Any, ...]], list[tuple[str, str, str]]]:
        """What to write of the keys: (conversations whose keys all go, keys saved, keys
        dropped)."""
        store, to_wall = self.store, self._wall() - self._clock()
        saved, dropped = [], []
        for name, ns, key in dirty:
            cv = store.get_convo(name)
            entry = cv.state.get(ns, {}).get(key) if cv is not None and cv.state else None
            if entry is None:
                dropped.append((name, ns, key))
            else:
                value, d = entry
                saved.append((name, ns, key, value, None if d == NO_DEADLINE else d + to_wall))
        return [(name,) for name in cleared], saved, dropped

    def _graves(self, buried: set[str]) -> tuple[list[tuple[str, bytes, float]], list[tuple[str]]]:
        """What to write of the graves: (those dug or changed, those gone)."""
        store, to_wall = self.store, self._wall() - self._clock()
        saved, gone = [], []
        for name in buried:
            grave = store.get_grave(name)
            if grave is None:
                gone.append((name,))
            else:
                ids = msgpack.packb(list(grave.ids.items()))
                saved.append((name, ids, grave.dug + to_wall))
        return saved, gone

    def _write(
        self,
        upserts: list[tuple[Any, ...]],
        deletes: list[tuple[str]],
        keys: tuple[list[tuple[str]], list[tuple[Any, ...]], list[tuple[str, str, str]]],
        graves: tuple[list[tuple[str, bytes, float]], list[tuple[str]]],
        used: list[tuple[float, int, str]],
        outbox: list[tuple[int, bytes]],
        delivered: list[tuple[int]],
    ) -> None:
        db = self._db
        assert db is not None
        with db:  # one transaction; commit on exit
            db.execute("BEGIN IMMEDIATE")
            cleared, saved, dropped = keys
            if deletes:
                db.executemany("DELETE FROM convos WHERE name = ?", deletes)
            if cleared:  # before the keys saved since: a conversation started again
                db.executemany("DELETE FROM keys WHERE name = ?", cleared)
            if dropped:
                db.executemany("DELETE FROM keys WHERE name = ? AND ns = ? AND key = ?", dropped)
            if upserts:
                db.executemany(UPSERT, upserts)
            if saved:
                db.executemany(UPSERT_KEY, saved)
            dug, gone = graves
            if gone:
                db.executemany("DELETE FROM graves WHERE name = ?", gone)
            if dug:
                db.executemany("INSERT OR REPLACE INTO graves VALUES (?, ?, ?)", dug)
            if used:
                db.executemany("UPDATE convos SET used = ?, tick = ? WHERE name = ?", used)
            if outbox:
                db.executemany("INSERT OR REPLACE INTO outbox VALUES (?, ?)", outbox)
            if delivered:
                db.executemany("DELETE FROM outbox WHERE n = ?", delivered)

    def _row(self, name: str, cv: Convo) -> tuple[Any, ...]:
        ids = msgpack.packb(list(cv.ids.items())) if cv.ids else None
        summary = msgpack.packb(cv.summary) if cv.summary else None
        return name, cv.seq, msgpack.packb(cv.turn_list()), ids, summary, cv.born

    def _restore(self, row: tuple[Any, ...], state: _Keys) -> None:
        name, seq, turns, ids, summary, born, used = row
        to_mono = self._clock() - self._wall()
        keys = {
            ns: {k: (v, NO_DEADLINE if d is None else d + to_mono) for k, (v, d) in entries.items()}
            for ns, entries in state.items()
        }
        remembered = _ids(ids)
        self.store.restore(
            name,
            turns=msgpack.unpackb(turns),
            seq=seq,
            state=keys,
            used=used + to_mono,
            ids=remembered,
            summary=tuple(msgpack.unpackb(summary)) if summary is not None else None,
            born=born,
        )


def _ids(packed: bytes | None) -> dict[Any, dict[str, Any]]:
    """Remembered ids as stored: (operation, id) pairs come back as lists; files of before
    kept the ids alone."""
    return {
        tuple(key) if isinstance(key, list) else key: fields
        for key, fields in (msgpack.unpackb(packed) if packed is not None else [])
    }


def _pack_trimmed(event: Trimmed) -> bytes:
    return msgpack.packb(
        [event.convo, event.count, event.turns, event.summary_upto, event.ts, event.born]
    )


def _unpack_trimmed(n: int, packed: bytes) -> Trimmed:
    convo, count, turns, upto, ts, born = msgpack.unpackb(packed)
    return Trimmed(convo, count, turns, upto, ts, born, n)
