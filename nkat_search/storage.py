"""Storage URLs: resolution (flag, environment, embedded default), masking, opening with heartbeats,
and the per-study lock that keeps the trial budget exact across workers.

This module and cli.py are the only places that read environment variables.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import threading
import warnings
from collections.abc import Iterator

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

from .config import StudyConfig, UsageError
from .objective import METRIC_NAMES
from .space import pruner, sampler

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


def journal_path(url: str) -> str | None:
    return url[len("journal:"):] if url.startswith("journal:") else None


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Open an Optuna storage; an unknown scheme or an unreachable database is a UsageError."""
    path = journal_path(url)
    if path is not None:
        if not path:
            raise UsageError("a journal storage needs a file: journal:PATH.")
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
        with budget_lock(url, "nkat-search schema"), warnings.catch_warnings():
            # Heartbeats are "experimental" since Optuna 2.9 and are what keeps trials from staying RUNNING.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=interval, grace_period=grace,
                              heartbeat_stale_trial_callback=retry_callback())
    except Exception as exc:  # sqlalchemy/driver errors: say what and where, never the password
        reason = mask(str(exc).strip().splitlines()[0]) if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot open the storage {mask(url)} ({reason}); check the host, port, user and "
                         "password, and that the server is running.") from None


def retry_callback() -> RetryHeartbeatStaleTrialCallback:
    """Optuna's callback that queues a failed trial again (same parameters, linked to the original)."""
    with warnings.catch_warnings():  # "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)


_local_lock = threading.Lock()


@contextlib.contextmanager
def budget_lock(url: str, study_name: str) -> Iterator[None]:
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
        engine = _lock_engine(url)
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
            yield
    else:
        with _local_lock:
            yield


_engines: dict[str, object] = {}


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


def study_names(storage) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


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
                         "`nkat-search start --study studies/<file>.toml` first.")
    definition = summaries[name].user_attrs.get("definition")
    if definition is None:
        raise UsageError(f"study {name!r} in {mask(url)} was not made by nkat-search start (it has no definition); "
                         "create it with `nkat-search start`.")
    config = StudyConfig.from_definition(definition)
    handle = optuna.load_study(study_name=name, storage=storage, sampler=sampler(config), pruner=pruner(config))
    return handle, config
