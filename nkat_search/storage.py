"""Storage URLs: resolution (flag, environment, embedded default), masking, opening with heartbeats
and safe retries, the per-study lock that keeps the trial budget exact across workers, and the
study's definition, budget and warm starts in the storage.

This module and cli.py are the only places that read environment variables. It imports no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
from optuna.storages import RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage
from optuna.trial import TrialState

from .config import RuntimeFailure, UsageError
from .metrics import METRIC_NAMES
from .space import pruner, sampler
from .study import StudyConfig, check_warm_start

log = logging.getLogger("nkat_search")
ENV_STORAGE = "NKAT_SEARCH_STORAGE"
# The embedded default: Optuna's journal file storage, safe for several local processes.
DEFAULT_URL = "journal:nkat-search.journal"
RDB_SCHEMES = ("postgresql", "mysql", "sqlite")
SECRET_WORDS = ("pass", "pwd", "secret", "token", "key")  # query parameters that can hold a credential
MAX_RETRY = 3
# One worker process holds at most this many database connections: the pool of the storage (the
# trial and its heartbeat thread) and one for the budget lock.
POOL_SIZE, POOL_OVERFLOW, LOCK_CONNECTIONS = 1, 1, 1


def resolve_url(flag: str | None) -> str:
    """--storage, else $NKAT_SEARCH_STORAGE, else the journal file in the working directory."""
    if flag is not None:
        if not flag.strip():
            raise UsageError("--storage is empty (an unset variable in a script?); pass a storage URL such as "
                             "journal:FILE or postgresql+psycopg://user@host/db.")
        return flag.strip()
    env = os.environ.get(ENV_STORAGE)
    if env is not None and not env.strip():
        raise UsageError(f"${ENV_STORAGE} is set but empty; set it to a storage URL or unset it.")
    return env.strip() if env else DEFAULT_URL


def parse_url(url: str):
    """SQLAlchemy's reading of a database URL, or None where it cannot be read unambiguously: it does
    not parse, or a password holds an '@' that is not percent-encoded. SQLAlchemy splits
    user:p@ss@host at the first '@' and would take the rest of the password for the host (or its
    port, or the database name), so no part of such a URL can be shown."""
    import sqlalchemy.engine

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception:
        return None
    if parsed.password is not None and ("@" in (parsed.host or "") or "@" in (parsed.database or "")):
        return None
    return parsed


def mask(url: str) -> str:
    """The URL with any password replaced by ***, for every log line and message.

    Parsed with SQLAlchemy's URL parser, never a regular expression; what cannot be read (see
    parse_url) is shown as its scheme only, since any other part could hold a credential."""
    if url.startswith("journal:"):
        return url
    parsed = parse_url(url)
    if parsed is None:
        scheme = url.split(":", 1)[0] if ":" in url else ""
        return f"{scheme}://***" if scheme.replace("+", "").isalnum() else "***"
    if parsed.password is None and "@" in url.split("://", 1)[-1].split("/", 1)[0] and parsed.username is None:
        return f"{parsed.drivername}://***"
    secret = {k: "***" for k in parsed.query if any(word in k.lower() for word in SECRET_WORDS)}
    if parsed.password is None and not secret:
        return url  # as the user wrote it (SQLAlchemy would percent-encode an '@' in a file name)
    return parsed.set(query={**parsed.query, **secret}).render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


# A password shorter than this is not searched for in messages: replacing every "pw" or "a" would
# mangle the words around it (and a driver's message does not quote a password).
MIN_MASKED = 4


def mask_text(text: str, url: str) -> str:
    """text (a driver's error message, say) with the URL and its password masked wherever they appear."""
    text = text.replace(url, mask(url))
    parsed = parse_url(url)
    if parsed is not None:
        secrets = [str(parsed.password or "")]
    else:  # the user part as written, and its pieces between '@' and ':'
        user = url.split("://", 1)[-1].rpartition("@")[0]
        secrets = [user, *user.replace(":", "@").split("@")]
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= MIN_MASKED:
            text = text.replace(secret, "***")
    return text


def heartbeat_settings() -> tuple[int, int, float]:
    """(heartbeat interval, grace period, database retry bound) in seconds, from
    NKAT_SEARCH_HEARTBEAT_INTERVAL (10), NKAT_SEARCH_GRACE_PERIOD (90) and NKAT_SEARCH_DB_RETRY_SECONDS (60).

    A worker waits for a database that went away for up to the retry bound, missing its heartbeats
    meanwhile; others must not take its trial for dead before it gives up: grace > bound + interval."""
    names = ("NKAT_SEARCH_HEARTBEAT_INTERVAL", "NKAT_SEARCH_GRACE_PERIOD", "NKAT_SEARCH_DB_RETRY_SECONDS")
    values = []
    for name, default in zip(names, ("10", "90", "60")):
        text = os.environ.get(name, default)
        try:
            values.append(int(text))
        except ValueError:
            raise UsageError(f"{name} must be a whole number of seconds, got {text!r}.") from None
    interval, grace, bound = values
    if interval < 1 or bound < 0:
        raise UsageError("NKAT_SEARCH_HEARTBEAT_INTERVAL must be >= 1 s and NKAT_SEARCH_DB_RETRY_SECONDS >= 0 s.")
    if grace <= bound + interval:
        raise UsageError(f"NKAT_SEARCH_GRACE_PERIOD ({grace} s) must be longer than NKAT_SEARCH_DB_RETRY_SECONDS "
                         f"({bound} s) plus NKAT_SEARCH_HEARTBEAT_INTERVAL ({interval} s), or a worker waiting for "
                         f"the database is taken for dead; raise the grace period above {bound + interval} s.")
    return interval, grace, float(bound)


class StorageUnavailable(RuntimeFailure):
    """The database stayed unreachable past the retry bound (exit 1)."""


class NoStudies(UsageError):
    """A command that only reads was pointed at a storage that does not exist yet (no file, no schema)."""


def connection_error(exc: BaseException | None) -> BaseException | None:
    """The driver's connection error behind exc (Optuna wraps it in StorageInternalError), if any."""
    import sqlalchemy.exc

    while exc is not None:
        if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) or getattr(
                exc, "connection_invalidated", False):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def with_reconnect(call: Callable, url: str, bound: float, on_recover: Callable[[], None] | None = None):
    """Run call(); while the database is unreachable, retry with bounded, logged exponential back-off.

    Only for calls that are harmless to repeat; call() itself must tell a repeat of an update that
    already landed (see RetryingRDBStorage)."""
    delay, waited = 0.5, 0.0
    while True:
        try:
            result = call()
        except Exception as exc:
            cause = connection_error(exc)
            if cause is None or bound <= 0:
                raise
            if waited >= bound:
                raise StorageUnavailable(
                    f"the database at {mask(url)} has been unreachable for {waited:.0f} s; this worker stops "
                    "(its trial is failed and queued again by the next worker once the database is back).") from None
            detail = str(getattr(cause, "orig", None) or cause).strip().splitlines()
            log.warning("database at %s unreachable (%s); retrying in %.1f s", mask(url),
                        mask_text(detail[0], url) if detail else type(cause).__name__, delay)
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 5.0)
            continue
        if waited and on_recover is not None:
            on_recover()
        return result


def _repeatable(name: str):
    """RDBStorage's method `name`, retried while the database is unreachable."""

    def call(self, *args, **kwargs):
        return self._retrying(lambda: getattr(RDBStorage, name)(self, *args, **kwargs))

    call.__name__ = name
    return call


class RetryingRDBStorage(RDBStorage):
    """RDBStorage whose repeatable calls wait for a restarted database instead of failing.

    Why our own: Optuna's RDBStorage fails a call on the first dropped connection. Only calls that
    are harmless to repeat are retried here: reads, upserts (attributes, intermediate values,
    heartbeats), and the two updates that can tell whether their first attempt landed (a parameter
    already stored with the same value; a trial already in the asked state, which under the budget
    lock only this worker can have set). The creation of a trial is not repeated here (Optuna
    repeats it a few times itself); when it fails, worker.run_loop waits for the database and asks
    again, and a trial whose reply was lost is RUNNING with no owner and no heartbeat, which
    worker.fail_dead_trials fails and requeues after the grace period."""

    def __init__(self, url: str, retry_seconds: float, **kwargs):
        self.url_for_messages, self.retry_seconds = url, 0.0  # opening fails fast
        self.gone: str | None = None
        self.recovered_at = float("-inf")  # time.monotonic() when a call last succeeded after an outage
        super().__init__(url, **kwargs)
        self.retry_seconds = retry_seconds

    def _retrying(self, call: Callable, landed: Callable[[], bool] | None = None):
        if self.gone is not None:  # the worker is stopping: its clean-up must not wait again
            raise StorageUnavailable(self.gone)
        attempts = []

        def attempt():
            if attempts and landed is not None and landed():
                return True
            attempts.append(1)
            return call()

        def recovered() -> None:
            self.recovered_at = time.monotonic()

        try:
            return with_reconnect(attempt, self.url_for_messages, self.retry_seconds, recovered)
        except StorageUnavailable as exc:
            self.gone = str(exc)
            raise

    # Reads, and upserts whose repeat writes the same row again.
    get_study_id_from_name = _repeatable("get_study_id_from_name")
    get_study_name_from_id = _repeatable("get_study_name_from_id")
    get_study_directions = _repeatable("get_study_directions")
    get_study_user_attrs = _repeatable("get_study_user_attrs")
    get_study_system_attrs = _repeatable("get_study_system_attrs")
    get_all_studies = _repeatable("get_all_studies")
    get_trial = _repeatable("get_trial")
    get_all_trials = _repeatable("get_all_trials")
    get_n_trials = _repeatable("get_n_trials")
    get_best_trial = _repeatable("get_best_trial")
    get_trial_id_from_study_id_trial_number = _repeatable("get_trial_id_from_study_id_trial_number")
    get_trial_param = _repeatable("get_trial_param")
    if hasattr(RDBStorage, "_get_stale_trial_ids"):  # else stale_trial_ids says so and the worker falls back
        _get_stale_trial_ids = _repeatable("_get_stale_trial_ids")
    # Optuna's _CachedStorage (which wraps every RDBStorage a Study uses) calls these private
    # reads instead of the public ones; they must wait for the database too.
    _get_trials = _repeatable("_get_trials")
    _get_best_trial_id = _repeatable("_get_best_trial_id")
    set_study_user_attr = _repeatable("set_study_user_attr")
    set_study_system_attr = _repeatable("set_study_system_attr")
    set_trial_user_attr = _repeatable("set_trial_user_attr")
    set_trial_system_attr = _repeatable("set_trial_system_attr")
    set_trial_intermediate_value = _repeatable("set_trial_intermediate_value")
    record_heartbeat = _repeatable("record_heartbeat")

    # Updates that can tell whether their first attempt landed. _set_trial_param is what both
    # RDBStorage.set_trial_param and Optuna's _CachedStorage call.
    def _set_trial_param(self, trial_id, param_name, param_value_internal, distribution,
                         previous_distribution=None):
        def landed() -> bool:
            try:
                return RDBStorage.get_trial_param(self, trial_id, param_name) == param_value_internal
            except KeyError:
                return False

        return self._retrying(lambda: RDBStorage._set_trial_param(
            self, trial_id, param_name, param_value_internal, distribution, previous_distribution), landed)

    def set_trial_state_values(self, trial_id, state, values=None):
        def landed() -> bool:
            trial = RDBStorage.get_trial(self, trial_id)
            return trial.state == state and (values is None or list(trial.values or []) == list(values))

        return self._retrying(lambda: RDBStorage.set_trial_state_values(self, trial_id, state, values), landed)


def journal_path(url: str) -> str | None:
    return url[len("journal:"):] if url.startswith("journal:") else None


def sqlite_path(url: str) -> str | None:
    """The database file of a sqlite URL; None for other schemes and for an in-memory database."""
    if not url.startswith("sqlite"):
        return None
    import sqlalchemy.engine

    database = sqlalchemy.engine.make_url(url).database
    return None if not database or database == ":memory:" else database


def open_storage(url: str, create: bool = True) -> optuna.storages.BaseStorage:
    """Open an Optuna storage; an unknown scheme, an unreachable database or a corrupt file is a UsageError.

    create=False is for commands that only read or join existing studies: a storage that does
    not exist yet is then an error instead of a new empty file, database or schema."""
    path = journal_path(url)
    if path is not None:
        return _open_journal(url, path, create)
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if scheme not in RDB_SCHEMES:
        raise UsageError(f"storage {mask(url)} has an unknown scheme {scheme!r}; use postgresql+psycopg://..., "
                         "sqlite:///FILE or journal:FILE.")
    if parse_url(url) is None:  # never quote SQLAlchemy's or the driver's words on it: they hold the password
        raise UsageError(f"cannot open the storage {mask(url)}: the URL cannot be split into user, password and "
                         "host (a password with '@' in it?); percent-encode '@' in the password as %40 (and ':' as "
                         "%3A, '/' as %2F).")
    interval, grace, bound = heartbeat_settings()
    db_file = sqlite_path(url) if scheme == "sqlite" else None
    if db_file is not None and not create and not Path(db_file).is_file():
        raise NoStudies(f"the storage {mask(url)} holds no studies ({db_file} does not exist); create one with "
                        "`nkat-search start --study <name or file>` or pass the right --storage.")
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
            storage = RetryingRDBStorage(url, bound, engine_kwargs=engine_kwargs, heartbeat_interval=interval,
                                         grace_period=grace, heartbeat_stale_trial_callback=retry,
                                         skip_table_creation=not create)
            if not create:
                storage.get_all_studies()  # a database without the schema holds no studies
            return storage
    except UsageError:
        raise
    except Exception as exc:  # sqlalchemy/driver errors: say what and where, never the password
        reason = _reason(exc, url)
        if not create and "does not exist" in reason and "relation" in reason:
            raise NoStudies(f"the storage {mask(url)} holds no studies (it has no Optuna tables); create one with "
                            "`nkat-search start` or pass the right --storage.") from None
        advice = ("check that the file is an SQLite database that you can read and write, or pass another --storage"
                  if scheme == "sqlite" else
                  "check the host, port, user and password, and that the server is running")
        raise UsageError(f"cannot open the storage {mask(url)} ({reason[:200]}); {advice}.") from None


def _probe(url: str) -> None:
    """Connect once and read the catalogue: an unreachable server, a wrong password or a file that is
    not a database fails here, with the driver's error. A new SQLite file is created empty."""
    import sqlalchemy

    connect_args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            # SQLite opens any file lazily; reading its catalogue reads the header.
            conn.execute(sqlalchemy.text("SELECT count(*) FROM sqlite_master" if url.startswith("sqlite")
                                         else "SELECT 1"))
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
    if not path:
        raise UsageError("a journal storage needs a file: journal:PATH.")
    file = Path(path)
    if not create and not file.exists():
        raise NoStudies(f"the storage {url} holds no studies ({path} does not exist); create one with "
                        "`nkat-search start --study <name or file>` or pass the right --storage.")
    if file.is_dir():
        raise UsageError(f"the journal {path} is a folder; pass --storage journal:<file path>.")
    directory = file.resolve().parent
    if not directory.is_dir() or not os.access(directory, os.W_OK):
        raise UsageError(f"cannot write the journal file {path}: {directory} is not a writable folder; "
                         "pass --storage journal:<writable path>.")
    try:
        return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    except Exception as exc:  # a file that is not an Optuna journal
        raise UsageError(f"{path} is not an Optuna journal file ({type(exc).__name__}: {str(exc)[:120]}); "
                         "pass the right --storage, or move the file away to start a new study.") from None


def retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a failed trial again: same parameters, linked to the original the way Optuna's
    RetryFailedTrialCallback links it (system attrs failed_trial, retry_history), but without
    copying the failed attempt's user attributes (its partial results and fail_reason) onto the
    retry. At most MAX_RETRY retries of one original trial; a trial that never got parameters has
    nothing to repeat."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRY:
        log.warning("trial %d failed %d times; not queueing it again", history[0], len(history))
        return
    if not trial.params:
        return
    original = trial.system_attrs.get("failed_trial", trial.number)
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={"retry_of": original},
        system_attrs={"failed_trial": original, "retry_history": history}))


def stale_trial_ids(storage: optuna.storages.BaseStorage, study_id: int) -> set[int] | None:
    """RUNNING trials of the study whose heartbeat is older than the grace period (RDB storages);
    None where the storage has heartbeats but no such query (see below).

    Why our own: Optuna's public optuna.storages.fail_stale_trials fails such trials first and
    only then calls back, when a finished trial's attributes can no longer be written, so the
    reason would be lost. This asks the storage for the ids only, through the private method that
    fail_stale_trials itself calls. Should a later Optuna rename it, the caller falls back to
    fail_stale_trials: the trials are still failed and retried (heartbeat_stale_trial_callback),
    only without the reason."""
    if not getattr(storage, "get_heartbeat_interval", lambda: None)():
        return set()
    ids = getattr(storage, "_get_stale_trial_ids", None)
    return None if ids is None else set(ids(study_id))


# ---------------------------------------------------------------------------------------------
# The budget lock


_local_locks: dict[str, threading.Lock] = {}


@contextlib.contextmanager
def budget_lock(url: str, study_name: str, retry_seconds: float | None = None) -> Iterator[Callable[[], bool]]:
    """Held while a worker counts finished trials and asks for a new one, so N workers never
    start more trials than the budget. Journal and SQLite: a lock file beside the storage file
    (filelock, on every OS); PostgreSQL: an advisory lock; MySQL: GET_LOCK; an in-memory
    SQLite database lives in one process: a thread lock. Yields held(): whether the lock is still
    held (a server drops a session lock with its connection, and the holder is not told)."""
    file = journal_path(url) or sqlite_path(url)
    if file is not None:
        import filelock

        with filelock.FileLock(f"{file}.budget.lock"):
            yield lambda: True
        return
    if url.startswith(("postgresql", "mysql")):
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
    if url.startswith("postgresql"):
        take, give, params = "SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)", {"key": key}
    else:  # MySQL's named locks are per connection too, like PostgreSQL's session-level advisory locks
        take, give = "SELECT GET_LOCK(:name, 31536000)", "SELECT RELEASE_LOCK(:name)"
        params = {"name": f"nkat-search:{hashlib.sha256(name.encode()).hexdigest()[:40]}"}

    def acquire():
        conn = _lock_engine(url).connect()
        try:
            conn.execute(sqlalchemy.text(take), params)
        except Exception:
            conn.invalidate()
            conn.close()
            raise
        return conn

    if url.startswith("postgresql"):
        # The lock's connection is its own (no pool): any advisory lock on it is this one.
        check, check_params = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                               "AND pid = pg_backend_pid()"), {}
    else:
        check, check_params = "SELECT IS_USED_LOCK(:name) = CONNECTION_ID()", params

    def held() -> bool:
        try:
            return bool(conn.execute(sqlalchemy.text(check), check_params).scalar())
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


_engines: dict[str, object] = {}


def _forget_engines() -> None:
    """A forked child must not share the parent's pooled lock connections (one socket, two clients)."""
    for engine in _engines.values():
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    os.register_at_fork(after_in_child=_forget_engines)


def _lock_engine(url: str):
    import sqlalchemy

    if url not in _engines:
        connect_args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
        # No pool: the lock's connection lives only while the lock is held, so an idle worker holds
        # none, and a lock can never sit on a connection the server dropped meanwhile.
        _engines[url] = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args=connect_args)
    return _engines[url]


# ---------------------------------------------------------------------------------------------
# Studies in the storage: the definition, budget and metric names live in study user attributes,
# where other workers, the dashboard and the leaderboard read them.


def create_or_resume(storage, url: str, study: StudyConfig, budget: int,
                     warm_start_from: str | None = None) -> optuna.Study:
    """Create the study, or resume it when it holds the same definition; record the budget;
    enqueue the study file's configurations (once); add an earlier study's finished trials to the
    sampler's history (warm start; they do not count against the budget)."""
    definition = study.definition()
    with budget_lock(url, study.name):
        existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
        warm = _warm_start_trials(storage, url, study, warm_start_from, existing) if warm_start_from else []
        if study.name in existing:
            stored = existing[study.name].user_attrs.get("definition")
            if stored != definition:
                changed = _changed_keys(stored or {}, definition)
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
        for params in study.enqueue:
            handle.enqueue_trial(params, user_attrs={"enqueued": True}, skip_if_exists=True)
        if warm:
            copied = {t.user_attrs.get("warm_start_trial") for t in handle.get_trials(deepcopy=False)}
            handle.add_trials([_warm_copy(t, warm_start_from) for t in warm
                               if f"{warm_start_from}#{t.number}" not in copied])
    return handle


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted keys at which two study definitions differ (space.lr, stage1.epochs)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and prefix.count(".") < 1:
            out += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def check_warm_start_source(url: str, study: StudyConfig, name: str) -> None:
    """--warm-start-from names another study that the storage holds: checked before `start` creates
    the storage or the study, so that a mistake there writes nothing."""
    try:
        names = optuna.get_all_study_names(open_storage(url, create=False))
    except NoStudies:
        names = []
    _check_source(url, study, name, names)


def _check_source(url: str, study: StudyConfig, name: str, names) -> None:
    if name == study.name:
        raise UsageError("--warm-start-from names the study itself; name an earlier study in the same storage.")
    if name not in names:
        listed = ", ".join(n for n in names if n != study.name) or "none"
        raise UsageError(f"--warm-start-from {name!r}: no such study in {mask(url)} (it holds: {listed}); "
                         "name one of those.")


def _warm_start_trials(storage, url: str, study: StudyConfig, name: str, existing: dict) -> list:
    _check_source(url, study, name, existing)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(states=(TrialState.COMPLETE,))
    if not trials:
        raise UsageError(f"--warm-start-from {name!r}: that study has no completed trials to learn from.")
    check_warm_start(study, trials)
    return trials


def _warm_copy(trial: optuna.trial.FrozenTrial, source: str) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        state=TrialState.COMPLETE, value=trial.value, params=trial.params, distributions=trial.distributions,
        intermediate_values=trial.intermediate_values,
        user_attrs={**trial.user_attrs, "warm_start_trial": f"{source}#{trial.number}"})


def is_warm_start(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial copied from an earlier study for the sampler's history (not run, not budgeted)."""
    return "warm_start_trial" in trial.user_attrs


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
    attrs = summaries[name].user_attrs
    definition = attrs.get("definition")
    if definition is None:
        raise UsageError(f"study {name!r} in {mask(url)} was not made by nkat-search start (it has no definition); "
                         "create it with `nkat-search start`.")
    try:
        config = StudyConfig.from_definition(definition, trials=int(attrs.get("budget", 1)))
    except UsageError as exc:
        raise UsageError(f"study {name!r} in {mask(url)} was made by another version of nkat-search and cannot be "
                         f"read ({exc}); run it with that version or start a new study.") from None
    handle = optuna.load_study(study_name=name, storage=storage, sampler=sampler(config), pruner=pruner(config))
    return handle, config
