"""The budget lock: one worker at a time asks for a trial. An advisory lock on PostgreSQL, a file
lock on journal and SQLite storages."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .retrying import with_reconnect
from .urls import heartbeat_settings, journal_path, sqlite_path

if TYPE_CHECKING:  # sqlalchemy is imported when a server lock is first taken
    from sqlalchemy import Engine

_local_locks: dict[str, threading.Lock] = {}


@contextlib.contextmanager
def budget_lock(url: str, study_name: str, retry_seconds: float | None = None) -> Iterator[Callable[[], bool]]:
    """Held while a worker counts finished trials and asks for a new one, so N workers never
    start more trials than the budget. Journal and SQLite: a lock file beside the storage file
    (filelock, on every OS); PostgreSQL: a session-level advisory lock; an in-memory
    SQLite database lives in one process: a thread lock. Yields held(): whether the lock is still
    held (a server drops a session lock with its connection, and the holder is not told)."""
    file = journal_path(url) or sqlite_path(url)
    if file is not None:
        import filelock

        with filelock.FileLock(f"{file}.budget.lock"):
            yield lambda: True
        return
    if url.startswith("postgresql"):
        bound = heartbeat_settings()[2] if retry_seconds is None else retry_seconds
        with _server_lock(url, study_name, bound) as held:
            yield held
        return
    lock = _local_locks.setdefault(url, threading.Lock())
    with lock:
        yield lambda: True


@contextlib.contextmanager
def _server_lock(url: str, name: str, bound: float) -> Iterator[Callable[[], bool]]:
    import sqlalchemy

    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    take, give, params = "SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)", {"key": key}

    def acquire():
        conn = _lock_engine(url).connect()
        try:
            conn.execute(sqlalchemy.text(take), params)
        except Exception:
            conn.invalidate()
            conn.close()
            raise
        return conn

    # The lock's connection is its own (no pool): any advisory lock on it is this one.
    check = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()"

    def held() -> bool:
        try:
            return bool(conn.execute(sqlalchemy.text(check)).scalar())
        except Exception:
            return False

    conn = with_reconnect(acquire, url, bound)
    try:
        yield held
    finally:
        try:
            conn.execute(sqlalchemy.text(give), params)
            conn.commit()
        except Exception:  # a dropped connection released its session lock already
            conn.invalidate()
        conn.close()


_engines: dict[str, Engine] = {}


def _forget_engines() -> None:
    """A forked child must not share the parent's pooled lock connections (one socket, two clients)."""
    for engine in _engines.values():
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    os.register_at_fork(after_in_child=_forget_engines)


def _lock_engine(url: str) -> Engine:
    import sqlalchemy

    if url not in _engines:
        connect_args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
        # No pool: the lock's connection lives only while the lock is held, so an idle worker holds
        # none, and a lock can never sit on a connection the server dropped meanwhile.
        _engines[url] = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args=connect_args)
    return _engines[url]
