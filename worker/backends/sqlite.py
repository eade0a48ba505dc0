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
from worker.store import NO_DEADLINE, Convo, Limits

SCHEMA = """
CREATE TABLE IF NOT EXISTS convos (
    name  TEXT PRIMARY KEY,
    seq   INTEGER NOT NULL,
    turns BLOB NOT NULL,
    state BLOB,
    ids   BLOB,
    used  REAL NOT NULL,  -- wall-clock time of the last use: the TTL runs from it
    tick  INTEGER NOT NULL  -- order of last use, for LRU (times can tie)
) WITHOUT ROWID;
"""
# Files made before summaries existed get their columns when opened.
NEW_COLUMNS = {
    "summary": "ALTER TABLE convos ADD COLUMN summary BLOB",  # msgpack [text, upto, tokens]
    "born": "ALTER TABLE convos ADD COLUMN born INTEGER NOT NULL DEFAULT 0",  # Unix ms
}
UPSERT = """
INSERT INTO convos(name, seq, turns, state, ids, summary, born, used, tick)
VALUES (?, ?, ?, ?, ?, ?, ?, 0, 0)
ON CONFLICT(name) DO UPDATE SET
    seq = excluded.seq, turns = excluded.turns, state = excluded.state, ids = excluded.ids,
    summary = excluded.summary, born = excluded.born
"""
# The same for a conversation whose state did not change: its state is left as written (a
# new one has none yet).
UPSERT_BUT_STATE = """
INSERT INTO convos(name, seq, turns, state, ids, summary, born, used, tick)
VALUES (?, ?, ?, NULL, ?, ?, ?, 0, 0)
ON CONFLICT(name) DO UPDATE SET
    seq = excluded.seq, turns = excluded.turns, ids = excluded.ids,
    summary = excluded.summary, born = excluded.born
"""


log = logging.getLogger("memory_worker.sqlite")


def _log_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("sqlite: refreshing TTLs failed: %s", fut.exception())


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

    # --- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(self._writer, self._connect)
        for row in rows:
            self._restore(row)
        self.store.enforce_bounds()  # the limits may be lower than when these were stored
        self.store.touched.clear()
        await self._commit()

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

    def _connect(self) -> list[tuple[Any, ...]]:
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
            rows = db.execute(
                "SELECT name, seq, turns, state, ids, summary, born, used FROM convos ORDER BY tick"
            ).fetchall()
            self._tick = db.execute("SELECT coalesce(max(tick), 0) FROM convos").fetchone()[0]
        except (OSError, sqlite3.Error) as exc:
            if db is not None:
                db.close()
            self._release()
            raise ConfigError(f"--backend sqlite: cannot open {self.path}: {exc}") from None
        self._db = db
        return rows

    async def close(self) -> None:
        if self._lazy is not None:
            await asyncio.shield(self._lazy)
        db, self._db = self._db, None
        if db is not None:
            await asyncio.get_running_loop().run_in_executor(self._writer, db.close)
        self._writer.shutdown(wait=True)
        self._release()

    # --- writing ----------------------------------------------------------------------------

    async def _commit(self) -> None:
        store = self.store
        assert store.dirty is not None
        dirty, touched, state_dirty = store.dirty, store.touched, store.state_dirty
        if not dirty and not touched:
            return
        store.dirty, store.touched, store.state_dirty = set(), {}, set()
        upserts, deletes, partial = [], [], []
        for name in dirty:
            cv = store.get_convo(name)
            if cv is None:
                deletes.append((name,))
            elif name in state_dirty:
                upserts.append(self._row(name, cv))
            else:
                partial.append(self._row(name, cv, state=False))
        now = self._wall()
        used = []
        for name in touched:
            if name in store:
                self._tick += 1
                used.append((now, self._tick, name))
        loop = asyncio.get_running_loop()
        write = loop.run_in_executor(self._writer, self._write, upserts, partial, deletes, used)
        if upserts or partial or deletes:
            try:
                await write
            except BaseException:
                store.dirty |= dirty  # written again with the next batch, whole rows
                store.state_dirty |= state_dirty
                raise
        else:
            # TTL refreshes only: no reply promises them, so nothing waits on the disk.
            write.add_done_callback(_log_failure)
            self._lazy = write

    def _write(
        self,
        upserts: list[tuple[Any, ...]],
        partial: list[tuple[Any, ...]],
        deletes: list[tuple[str]],
        used: list[tuple[float, int, str]],
    ) -> None:
        db = self._db
        assert db is not None
        with db:  # one transaction; commit on exit
            db.execute("BEGIN IMMEDIATE")
            if deletes:
                db.executemany("DELETE FROM convos WHERE name = ?", deletes)
            if upserts:
                db.executemany(UPSERT, upserts)
            if partial:
                db.executemany(UPSERT_BUT_STATE, partial)
            if used:
                db.executemany("UPDATE convos SET used = ?, tick = ? WHERE name = ?", used)

    def _row(self, name: str, cv: Convo, *, state: bool = True) -> tuple[Any, ...]:
        """The row's values for UPSERT, or with `state` False for UPSERT_BUT_STATE."""
        ids = msgpack.packb(list(cv.ids.items())) if cv.ids else None
        summary = msgpack.packb(cv.summary) if cv.summary else None
        turns = msgpack.packb(cv.turn_list())
        if not state:
            return name, cv.seq, turns, ids, summary, cv.born
        to_wall = self._wall() - self._clock()
        packed = None
        if cv.state:
            packed = msgpack.packb(
                {
                    ns: {
                        k: [v, None if d == NO_DEADLINE else d + to_wall]
                        for k, (v, d) in keys.items()
                    }
                    for ns, keys in cv.state.items()
                }
            )
        return name, cv.seq, turns, packed, ids, summary, cv.born

    def _restore(self, row: tuple[Any, ...]) -> None:
        name, seq, turns, state, ids, summary, born, used = row
        to_mono = self._clock() - self._wall()
        keys: dict[str, dict[str, tuple[bytes, float]]] = {}
        if state is not None:
            for ns, entries in msgpack.unpackb(state).items():
                keys[ns] = {
                    k: (v, NO_DEADLINE if d is None else d + to_mono)
                    for k, (v, d) in entries.items()
                }
        # (operation, id) pairs come back as lists; files of before kept the ids alone.
        remembered = {
            tuple(key) if isinstance(key, list) else key: fields
            for key, fields in (msgpack.unpackb(ids) if ids is not None else [])
        }
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
