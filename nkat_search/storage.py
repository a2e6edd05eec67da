"""Storage URLs: resolution (flag, environment, embedded default), masking, opening with heartbeats,
and the per-study lock that keeps the trial budget exact across workers.

This module and cli.py are the only places that read environment variables.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import hashlib
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator

import optuna
from optuna.storages import RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

from .config import StudyConfig, UsageError
from .objective import METRIC_NAMES
from .space import pruner, sampler

log = logging.getLogger("nkat_search")
ENV_STORAGE = "NKAT_SEARCH_STORAGE"
# The embedded default: Optuna's journal file storage, safe for several local processes.
DEFAULT_URL = "journal:nkat-search.journal"
RDB_SCHEMES = ("postgresql", "mysql", "sqlite")
MAX_RETRY = 3


def resolve_url(flag: str | None) -> str:
    return flag or os.environ.get(ENV_STORAGE) or DEFAULT_URL


def mask(url: str) -> str:
    """The URL with its password replaced by ***, for every log line and message."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def heartbeat_settings() -> tuple[int, int]:
    """(interval, grace period) in seconds; NKAT_SEARCH_HEARTBEAT_INTERVAL / _GRACE_PERIOD."""
    try:
        interval = int(os.environ.get("NKAT_SEARCH_HEARTBEAT_INTERVAL", "10"))
        grace = int(os.environ.get("NKAT_SEARCH_GRACE_PERIOD", "60"))
    except ValueError:
        raise UsageError("NKAT_SEARCH_HEARTBEAT_INTERVAL and NKAT_SEARCH_GRACE_PERIOD must be whole seconds.") from None
    if interval < 1 or grace <= interval:
        raise UsageError("the heartbeat interval must be >= 1 s and the grace period longer than it.")
    return interval, grace


def db_retry_seconds() -> float:
    """How long a worker waits for a database that went away (NKAT_SEARCH_DB_RETRY_SECONDS, default 120)."""
    try:
        return float(os.environ.get("NKAT_SEARCH_DB_RETRY_SECONDS", "120"))
    except ValueError:
        raise UsageError("NKAT_SEARCH_DB_RETRY_SECONDS must be a number of seconds.") from None


class StorageUnavailable(RuntimeError):
    """The database stayed unreachable past the retry bound (exit 1)."""


def _connection_error(exc: BaseException) -> BaseException | None:
    """The driver's connection error behind exc (Optuna wraps it in StorageInternalError), if any."""
    import sqlalchemy.exc

    while exc is not None:
        if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) or getattr(
                exc, "connection_invalidated", False):
            return exc
        exc = exc.__cause__
    return None


def with_reconnect(call, url: str, bound: float):
    """Run call(); while the database is unreachable, retry with bounded, logged exponential back-off."""
    delay, waited = 0.5, 0.0
    while True:
        try:
            return call()
        except Exception as exc:
            cause = _connection_error(exc)
            if cause is None or bound <= 0:
                raise
            if waited >= bound:
                raise StorageUnavailable(
                    f"the database at {mask(url)} has been unreachable for {waited:.0f} s; this worker stops "
                    "(its trial is failed and queued again by the next worker once the database is back).") from None
            detail = str(getattr(cause, "orig", None) or cause).strip().splitlines()
            log.warning("database at %s unreachable (%s); retrying in %.1f s", mask(url),
                        mask(detail[0]) if detail else type(cause).__name__, delay)
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 10.0)


class ResilientRDBStorage(RDBStorage):
    """RDBStorage whose calls wait for a restarted database (bounded back-off) instead of failing."""

    def __init__(self, url: str, retry_seconds: float, **kwargs):
        self._url_for_retry, self._retry_seconds, self._gone = url, 0.0, None  # opening fails fast
        super().__init__(url, **kwargs)
        self._retry_seconds = retry_seconds


def _resilient(name: str):
    method = getattr(RDBStorage, name)

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self._gone is not None:  # the worker is stopping: its clean-up must not wait again
            raise StorageUnavailable(self._gone)
        try:
            return with_reconnect(lambda: method(self, *args, **kwargs), self._url_for_retry, self._retry_seconds)
        except StorageUnavailable as exc:
            self._gone = str(exc)
            raise

    return call


for _name, _value in list(vars(RDBStorage).items()):
    if callable(_value) and (not _name.startswith("_") or _name == "_get_stale_trial_ids") and _name not in (
            "remove_session", "upgrade", "get_current_version", "get_head_version", "get_all_versions"):
        setattr(ResilientRDBStorage, _name, _resilient(_name))


def journal_path(url: str) -> str | None:
    return url[len("journal:"):] if url.startswith("journal:") else None


def open_storage(url: str, create: bool = True) -> optuna.storages.BaseStorage:
    """Open an Optuna storage; an unknown scheme or an unreachable database is a UsageError.

    create=False is for commands that only read or join existing studies: a journal file that
    does not exist is then an error instead of a new empty file."""
    path = journal_path(url)
    if path is not None:
        if not path:
            raise UsageError("a journal storage needs a file: journal:PATH.")
        if not create and not os.path.exists(path):
            raise UsageError(f"the storage {url} holds no studies ({path} does not exist); create one with "
                             "`nkat-search start --study <name or file>` or pass the right --storage.")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.access(directory, os.W_OK):
            raise UsageError(f"cannot write the journal file {path}: {directory} is not writable; "
                             "pass --storage journal:<writable path>.")
        return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if scheme not in RDB_SCHEMES:
        raise UsageError(f"storage {mask(url)} has an unknown scheme {scheme!r}; use postgresql+psycopg://..., "
                         "sqlite:///FILE or journal:FILE.")
    interval, grace = heartbeat_settings()
    engine_kwargs: dict = {"pool_pre_ping": True}
    if scheme == "postgresql":
        # One worker process holds a connection for the trial, one for the heartbeat thread and
        # one for the budget lock: a small pool keeps tens of workers under max_connections.
        engine_kwargs.update(pool_size=3, max_overflow=2, connect_args={"connect_timeout": 5})
    try:
        # Workers starting at once would race to create the schema: serialise that step.
        with budget_lock(url, "nkat-search schema", retry_seconds=0), warnings.catch_warnings():
            # Heartbeats are "experimental" since Optuna 2.9 and are what keeps trials from staying RUNNING.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return ResilientRDBStorage(url, db_retry_seconds(), engine_kwargs=engine_kwargs,
                                       heartbeat_interval=interval, grace_period=grace,
                                       heartbeat_stale_trial_callback=retry)
    except Exception as exc:  # sqlalchemy/driver errors: say what and where, never the password
        reason = mask(str(exc).strip().splitlines()[0]) if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot open the storage {mask(url)} ({reason}); check the host, port, user and "
                         "password, and that the server is running.") from None


def retry(study: optuna.Study, trial) -> None:
    """Queue a failed trial again: same parameters, linked to the original the way Optuna's
    RetryHeartbeatStaleTrialCallback links it (system attrs failed_trial, retry_history), but
    without copying the failed attempt's user attributes (its partial results and fail_reason)
    onto the retry. At most MAX_RETRY retries of one original trial."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRY:
        log.warning("trial %d failed %d times; not queueing it again", history[0], len(history))
        return
    original = trial.system_attrs.get("failed_trial", trial.number)
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={"retry_of": original},
        system_attrs={"failed_trial": original, "retry_history": history}))


_local_lock = threading.Lock()


@contextlib.contextmanager
def budget_lock(url: str, study_name: str, retry_seconds: float | None = None) -> Iterator[None]:
    """Held while a worker counts finished trials and asks for a new one, so N workers never
    start more trials than the budget: a PostgreSQL advisory lock, or a lock file beside a journal."""
    path = journal_path(url)
    if path is not None:
        with open(f"{path}.budget.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    elif url.startswith("postgresql"):
        import sqlalchemy

        key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
        def acquire():
            conn = _lock_engine(url).connect()
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            except Exception:
                conn.invalidate()
                conn.close()
                raise
            return conn

        conn = with_reconnect(acquire, url, db_retry_seconds() if retry_seconds is None else retry_seconds)
        try:
            yield
        finally:
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                conn.commit()
            except Exception:  # a dropped connection released its session lock already
                conn.invalidate()
            conn.close()
    else:
        with _local_lock:
            yield


_engines: dict[str, object] = {}
# A forked child must not share the parent's pooled lock connections (one socket, two clients).
os.register_at_fork(after_in_child=lambda: [engine.dispose(close=False) for engine in _engines.values()])


def _lock_engine(url: str):
    import sqlalchemy

    if url not in _engines:
        _engines[url] = sqlalchemy.create_engine(url, pool_size=1, max_overflow=0, pool_pre_ping=True,
                                                 connect_args={"connect_timeout": 5})
    return _engines[url]


# ---------------------------------------------------------------------------------------------
# Studies in the storage: the definition, budget and metric names live in study user attributes,
# where other workers, the dashboard and the leaderboard read them.


def create_or_resume(storage, url: str, study: StudyConfig, budget: int) -> optuna.Study:
    """Create the study, or resume it when it holds the same definition; record the budget."""
    definition = study.definition()
    with budget_lock(url, study.name):
        existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
        if study.name in existing:
            stored = existing[study.name].user_attrs.get("definition")
            if stored != definition:
                changed = sorted(k for k in set(definition) | set(stored or {})
                                 if (stored or {}).get(k) != definition.get(k))
                raise UsageError(
                    f"study {study.name!r} already exists in {mask(url)} with a different definition "
                    f"({', '.join(changed)} differ); rename the study in {study.path} or use the file it was made from.")
        handle = optuna.create_study(storage=storage, study_name=study.name, direction="maximize",
                                     sampler=sampler(study), pruner=pruner(study), load_if_exists=True)
        with warnings.catch_warnings():  # experimental since Optuna 3.2, and the dashboard reads it
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            handle.set_metric_names(METRIC_NAMES)
        handle.set_user_attr("definition", definition)
        handle.set_user_attr("budget", budget)
        handle.set_user_attr("direction", "maximize")
        handle.set_user_attr("gate", {"dataset": study.stage1_dataset, "metric": "local_tpe", "threshold": study.gate})
    return handle


def attach(storage, url: str, name: str | None) -> tuple[optuna.Study, StudyConfig]:
    """Load an existing study and its definition; a missing study is a UsageError."""
    summaries = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    names = list(summaries)
    if name is None:
        if len(names) != 1:
            listed = ", ".join(names) or "none"
            raise UsageError(f"the storage {mask(url)} holds {len(names)} studies ({listed}); pass --study NAME "
                             "or set NKAT_SEARCH_STUDY.")
        name = names[0]
    if name not in names:
        raise UsageError(f"study {name!r} does not exist in {mask(url)}; create it with "
                         "`nkat-search start --study <name or file>` first.")
    definition = summaries[name].user_attrs.get("definition")
    if definition is None:
        raise UsageError(f"study {name!r} in {mask(url)} was not made by nkat-search start (it has no definition); "
                         "create it with `nkat-search start`.")
    config = StudyConfig.from_definition(definition)
    handle = optuna.load_study(study_name=name, storage=storage, sampler=sampler(config), pruner=pruner(config))
    return handle, config
