"""Opening a storage by its URL: the journal file, SQLite and PostgreSQL, with heartbeats where
the storage has them, and one sentence when it cannot be opened."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import optuna
from optuna.storages.journal import (
    JournalFileBackend,
    JournalFileOpenLock,
    JournalStorage,
)

from ..config import UsageError
from .lock import budget_lock
from .retrying import RetryingRDBStorage, retry
from .urls import (
    POOL_OVERFLOW,
    POOL_SIZE,
    RDB_SCHEMES,
    NoStudies,
    heartbeat_settings,
    journal_path,
    mask,
    mask_text,
    parse_url,
    sqlite_path,
)

log = logging.getLogger("nkat_search")


def open_storage(url: str, create: bool = True) -> optuna.storages.BaseStorage:
    """Open an Optuna storage; an unknown scheme, an unreachable database or a corrupt file is a UsageError.

    create=False is for commands that only read or join existing studies: a storage that does
    not exist yet is then an error instead of a new empty file, database or schema."""
    path = journal_path(url)
    if path is not None:
        return _open_journal(url, path, create)
    scheme = _checked_scheme(url)
    interval, grace, bound = heartbeat_settings()
    db_file = sqlite_path(url) if scheme == "sqlite" else None
    if db_file is not None and not create and not Path(db_file).is_file():
        raise NoStudies(
            f"the storage {mask(url)} holds no studies ({db_file} does not exist); create one with "
            "`nkat-search start --study <name or file>` or pass the right --storage."
        )
    engine_kwargs: dict = {"pool_pre_ping": True}
    if scheme == "postgresql":
        # A small pool keeps tens of workers under the server's max_connections (see README).
        engine_kwargs.update(pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW, connect_args={"connect_timeout": 5})
    try:
        # Before anything is created (the schema lock's file among them), and for the driver's own
        # reason where Optuna would give only "An exception is raised during the commit".
        _probe(url)
        # Workers starting at once would race to create the schema: serialise that step.
        lock = budget_lock(url, "nkat-search schema", retry_seconds=0) if create else contextlib.nullcontext()
        with lock, warnings.catch_warnings():
            # Heartbeats are "experimental" since Optuna 2.9 and are what keeps trials from staying RUNNING.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = RetryingRDBStorage(
                url,
                bound,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=interval,
                grace_period=grace,
                heartbeat_stale_trial_callback=retry,
                skip_table_creation=not create,
            )
            if not create:
                storage.get_all_studies()  # a database without the schema holds no studies
            return storage
    except UsageError:
        raise
    except Exception as exc:  # sqlalchemy/driver errors: say what and where, never the password
        raise _cannot_open(exc, url, scheme, create) from None


def _cannot_open(exc: Exception, url: str, scheme: str, create: bool) -> UsageError:
    """SQLAlchemy's or the driver's error as one sentence: what and where, never the password."""
    reason = _reason(exc, url)
    if not create and "does not exist" in reason and "relation" in reason:
        return NoStudies(
            f"the storage {mask(url)} holds no studies (it has no Optuna tables); create one with "
            "`nkat-search start` or pass the right --storage."
        )
    advice = (
        "check that the file is an SQLite database that you can read and write, or pass another --storage"
        if scheme == "sqlite"
        else "check the host, port, user and password, and that the server is running"
    )
    return UsageError(f"cannot open the storage {mask(url)} ({reason[:200]}); {advice}.")


def check_storage(url: str) -> None:
    """Refuse what can be told of a storage without writing to it: the URL, the heartbeat settings,
    a journal's folder, a database server's reachability and password, an existing SQLite file.
    `start` calls it before the seconds it spends on torch and the data (a download of CIFAR-10
    can take minutes), so that a mistaken --storage is told at once."""
    path = journal_path(url)
    heartbeat_settings()
    if path is not None:
        _journal_checks(url, path, create=True)
        return
    scheme = _checked_scheme(url)
    db_file = sqlite_path(url) if scheme == "sqlite" else None
    if db_file is not None and not Path(db_file).is_file():
        return  # probing would create it: open_storage does, once everything else is checked
    try:
        _probe(url)
    except Exception as exc:
        raise _cannot_open(exc, url, scheme, create=True) from None


def _checked_scheme(url: str) -> str:
    """The URL's database scheme, once the URL is one nkat-search can open (else a UsageError)."""
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if scheme in ("mysql", "mariadb"):
        raise UsageError(
            f"storage {mask(url)} is MySQL, which nkat-search does not support (its budget lock and "
            "fault handling are tested on PostgreSQL only); use postgresql+psycopg://..., "
            "sqlite:///FILE or journal:FILE."
        )
    if scheme not in RDB_SCHEMES:
        raise UsageError(
            f"storage {mask(url)} has an unknown scheme {scheme!r}; use postgresql+psycopg://..., "
            "sqlite:///FILE or journal:FILE."
        )
    if parse_url(url) is None:  # never quote SQLAlchemy's or the driver's words on it: they hold the password
        raise UsageError(
            f"cannot open the storage {mask(url)}: the URL cannot be split into user, password and "
            "host (a password with '@' in it?); percent-encode '@' in the password as %40 (and ':' as "
            "%3A, '/' as %2F)."
        )
    return scheme


def _probe(url: str) -> None:
    """Connect once and read the catalogue: an unreachable server, a wrong password or a file that is
    not a database fails here, with the driver's error. A new SQLite file is created empty."""
    import sqlalchemy

    connect_args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            # SQLite opens any file lazily; reading its catalogue reads the header.
            conn.execute(
                sqlalchemy.text("SELECT count(*) FROM sqlite_master" if url.startswith("sqlite") else "SELECT 1")
            )
    finally:
        engine.dispose()


def _reason(exc: BaseException, url: str) -> str:
    """The first line of the database's own error behind exc (Optuna wraps it in StorageInternalError
    with a text of its own), masked."""
    import sqlalchemy.exc

    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, sqlalchemy.exc.SQLAlchemyError):
        cause = cause.__cause__ or cause.__context__
    first = str(cause if cause is not None else exc).strip().splitlines()
    return mask_text(first[0], url) if first else type(exc).__name__


def _open_journal(url: str, path: str, create: bool) -> JournalStorage:
    _journal_checks(url, path, create)
    try:
        return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    except Exception as exc:  # a file that is not an Optuna journal
        raise UsageError(
            f"{path} is not an Optuna journal file ({type(exc).__name__}: {str(exc)[:120]}); "
            "pass the right --storage, or move the file away to start a new study."
        ) from None


def _journal_checks(url: str, path: str, create: bool) -> None:
    """What can be told of a journal storage without opening (or creating) its file."""
    if not path:
        raise UsageError("a journal storage needs a file: journal:PATH.")
    file = Path(path)
    if not create and not file.exists():
        raise NoStudies(
            f"the storage {url} holds no studies ({path} does not exist); create one with "
            "`nkat-search start --study <name or file>` or pass the right --storage."
        )
    if file.is_dir():
        raise UsageError(f"the journal {path} is a folder; pass --storage journal:<file path>.")
    directory = file.resolve().parent
    if not directory.is_dir() or not os.access(directory, os.W_OK):
        raise UsageError(
            f"cannot write the journal file {path}: {directory} is not a writable folder; "
            "pass --storage journal:<writable path>."
        )
