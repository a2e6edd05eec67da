"""A seeded fault campaign for the storage and worker layer: random schedules of faults at
storage-call granularity against 2-4 worker processes that share one small budget, each schedule
checked against what the workers promise (docs/reliability.md). A trivial objective, no torch.

    .venv/bin/python -m benchmarks.faults --schedules 2000 --jobs 6
    .venv/bin/python -m benchmarks.faults --seed 1234 --storage postgresql [--repeat 20]

A schedule is drawn from its seed and storage alone, so a failing one runs again with the command
its report prints; the interleaving of the processes is the machine's, so a race may take a few
runs (--repeat). The workers run the real loop (worker.run_loop with the storage of
backends.open_storage, its retries and the budget lock, and the signal handlers of `nkat-search
worker`), forked from a multiprocessing fork server that has imported the storage layer once
(whoever imports this module to run schedules must guard its main, as multiprocessing asks). The
faults:

- drop: the worker's database connection is terminated (pg_terminate_backend) before the first
  statement of its n-th call of one storage method (retried attempts count as calls).
- lost_reply: the n-th call's transaction is committed, then its connection terminated before
  the worker hears of it.
- lock_drop: the budget lock's connection is terminated during the n-th call of one method that
  the worker makes while it holds the lock.
- sigkill, sigterm: the worker signals itself before the n-th call of a method, as it commits
  (before the driver's commit) or right after its commit; or the campaign signals it a moment
  after the start.
- restart: the database is stopped (fast or immediate) and started again a moment after the start.

After each schedule: exactly the budget finished, nothing left RUNNING or WAITING, no trial number
twice, every FAIL with its reason (one that a fault explains), every failed configuration queued
again with retry_of, every worker ended by itself with the exit code its faults allow (check).
Printed: schedules run, faults injected by kind, violations with the command that reproduces each.

PostgreSQL: every concurrent slot runs its schedules on a throwaway server of its own, launched by
tests/pg_server.py (imported as it is: its launch() is the test suite's), so that a restart
touches one schedule only. The journal file has no connections: its schedules get the signals
only, all workers on one host.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import tomllib
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
from optuna.trial import TrialState

from nkat_search.config import RuntimeFailure
from nkat_search.search import signals, space, studies, worker
from nkat_search.search.study_file import StudyConfig, parse_study
from nkat_search.storage import backends, lock, retrying

ROOT = Path(__file__).resolve().parent.parent

STUDY = "faults"

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

# The RDBStorage methods the worker loop calls (Optuna's _CachedStorage calls the private ones),
# with how many times one worker calls each in a schedule about half the time (measured without
# faults): the n of a fault is drawn up to that, so that most faults are reached.
PG_CALLS = {
    "get_study_user_attrs": 4,
    "_get_stale_trial_ids": 3,
    "_get_trials": 8,
    "get_trial": 4,
    "get_trial_id_from_study_id_trial_number": 4,
    "set_trial_user_attr": 2,
    "record_heartbeat": 1,
    "set_trial_intermediate_value": 1,
    "set_trial_state_values": 2,
    "_create_new_trial": 1,
    "_set_trial_param": 3,
}
WRITES = (
    "set_trial_user_attr",
    "record_heartbeat",
    "set_trial_intermediate_value",
    "set_trial_state_values",
    "_create_new_trial",
    "_set_trial_param",
)
# Calls a worker makes while it holds the budget lock (failing dead trials, counting, asking, claiming).
LOCKED_CALLS = {
    "_get_stale_trial_ids": 2,
    "_get_trials": 4,
    "_create_new_trial": 1,
    "set_trial_state_values": 1,
    "record_heartbeat": 1,
    "set_trial_user_attr": 1,
}
JOURNAL_CALLS = {
    "get_study_user_attrs": 4,
    "get_all_trials": 8,
    "get_trial": 4,
    "get_trial_id_from_study_id_trial_number": 4,
    "create_new_trial": 1,
    "set_trial_param": 3,
    "set_trial_state_values": 2,
    "set_trial_intermediate_value": 1,
    "set_trial_user_attr": 2,
}
KINDS = {
    "postgresql": ("drop", "lost_reply", "lock_drop", "sigkill", "sigterm", "restart"),
    "journal": ("sigkill", "sigterm"),
}
ALL_KINDS = KINDS["postgresql"]

LOST_LOCK = "not run: the budget lock was lost while asking"

# What a trial may be FAILED for in these schedules: the objective never raises, so any other
# reason (a storage error reaching a trial, say) is a violation.
REASONS = (
    "interrupted",
    "worker ",
    "no heartbeat from worker ",
    "no owner and no heartbeat ",
    LOST_LOCK,
    worker.LOST_DATABASE,
)

# How long the workers of one schedule may take before they count as hung.
TIMEOUT = 90.0

# A waiting worker asks again after this many seconds (each ask is several storage calls).
POLL = 0.5

STUDY_TOML = """
[study]
name = "faults"
trials = {budget}

[sampler]
kind = "random"
seed = {seed}

[pruner]
kind = "none"

[stage1]
dataset = "cifar10"
epochs = 1
gate = 0.01

[stage2]
datasets = ["mnist"]
epochs = 1

[data]
source = "synthetic"

[space.embed_dim]
type = "int"
low = 8
high = 32
step = 8

[space.temperature]
type = "float"
low = 0.6
high = 1.0
"""


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    worker: int = -1  # -1: the database (restart)
    call: str = ""  # the storage method; "" for a fault at a time (at) instead
    n: int = 0  # the worker's n-th call of that method (with kind lock_drop: n-th while holding the lock)
    # "before" the call's first statement; "commit": as it commits, before the driver's commit;
    # "after" the driver's commit (journal: before or after the call)
    phase: str = "before"
    at: float = 0.0  # seconds after the start (timed signals, restart)
    down: float = 0.0  # restart: seconds the server stays down
    mode: str = "fast"  # restart: pg_ctl stop mode

    def __str__(self) -> str:
        if self.kind == "restart":
            return f"restart ({self.mode}) at {self.at:.2f} s, down {self.down:.2f} s"
        phase = "at the commit of" if self.phase == "commit" else self.phase
        where = f"{phase} call {self.n} of {self.call}" if self.call else f"at {self.at:.2f} s"
        return f"{self.kind} of worker {self.worker} {where}"


@dataclasses.dataclass(frozen=True)
class Schedule:
    seed: int
    storage: str
    workers: int
    budget: int
    enqueued: int  # configurations in the study file's [[enqueue]]
    seconds: float  # the objective's sleep before its one report
    hosts: str  # "one": all workers on this host; "many": each names a host of its own
    faults: tuple[Fault, ...]
    interval: int  # NKAT_SEARCH_HEARTBEAT_INTERVAL
    grace: int  # NKAT_SEARCH_GRACE_PERIOD
    retry: int  # NKAT_SEARCH_DB_RETRY_SECONDS

    @property
    def command(self) -> str:
        return f".venv/bin/python -m benchmarks.faults --seed {self.seed} --storage {self.storage}"

    def __str__(self) -> str:
        return (
            f"seed {self.seed} on {self.storage}: {self.workers} workers on {self.hosts} host(s), budget "
            f"{self.budget} ({self.enqueued} enqueued), trials of {self.seconds} s, heartbeat {self.interval} s, "
            f"grace {self.grace} s, retry {self.retry} s; faults: {'; '.join(map(str, self.faults)) or 'none'}"
        )


def draw(seed: int, storage: str) -> Schedule:
    """The schedule of a seed on a storage: workers, budget and 1-3 faults; at least one worker is never signalled."""
    rng = random.Random(f"{storage}:{seed}")
    pg = storage == "postgresql"
    workers = rng.randint(2, 4)
    calls = PG_CALLS if pg else JOURNAL_CALLS
    faults: list[Fault] = []
    signalled: set[int] = set()

    def add(fault: Fault) -> None:
        if fault not in faults:  # the same fault drawn twice is one
            faults.append(fault)

    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(KINDS[storage])
        if kind in ("sigkill", "sigterm") and len(signalled) == workers - 1:
            kind = "drop" if pg else ""
        if kind == "restart" and any(f.kind == "restart" for f in faults):
            kind = "lost_reply"
        if not kind:
            continue
        if kind == "restart":
            add(
                Fault(
                    "restart",
                    at=round(rng.uniform(0.1, 2.0), 2),
                    down=round(rng.uniform(0, 1.0), 2),
                    mode=rng.choice(("fast", "immediate")),
                )
            )
            continue
        if kind in ("sigkill", "sigterm"):
            target = rng.choice([i for i in range(workers) if i not in signalled])
            signalled.add(target)
            if rng.random() < 0.3:
                add(Fault(kind, target, at=round(rng.uniform(0.05, 2.5), 2)))
                continue
            call = rng.choice(sorted(calls))
            phase = rng.choice(("before", "commit", "after") if pg else ("before", "after"))
            add(Fault(kind, target, call, rng.randint(1, calls[call]), phase))
            continue
        target = rng.randrange(workers)
        if kind == "drop":
            call = rng.choice(sorted(calls))
            add(Fault(kind, target, call, rng.randint(1, calls[call]), "before"))
        elif kind == "lost_reply":
            call = rng.choice(WRITES)
            add(Fault(kind, target, call, rng.randint(1, calls[call]), "after"))
        else:
            call = rng.choice(sorted(LOCKED_CALLS))
            add(Fault(kind, target, call, rng.randint(1, LOCKED_CALLS[call]), "before"))
    restart = any(f.kind == "restart" for f in faults)
    # A worker waits out a restart (a few seconds on a busy machine) within the retry bound, and a
    # dropped connection in one back-off step; the grace period must exceed the bound plus the
    # interval (urls.heartbeat_settings).
    interval, retry = 1, 4 if restart else 1
    return Schedule(
        seed,
        storage,
        workers,
        budget=rng.randint(2, 6),
        enqueued=rng.choice((0, 0, 1, 2)),
        seconds=rng.choice((0.0, 0.05, 0.2)),
        hosts=rng.choice(("one", "many")) if pg else "one",
        faults=tuple(faults),
        interval=interval,
        grace=retry + interval + 1,
        retry=retry,
    )


def study_config(schedule: Schedule) -> StudyConfig:
    text = STUDY_TOML.format(budget=schedule.budget, seed=schedule.seed % 2**31)
    rng = random.Random(f"enqueue:{schedule.seed}")
    for _ in range(schedule.enqueued):
        text += f"\n[[enqueue]]\nembed_dim = {rng.choice((8, 16, 24, 32))}\ntemperature = {rng.uniform(0.6, 1.0):.3f}\n"
    return parse_study(tomllib.loads(text), "<fault campaign>")


# ---------------------------------------------------------------------------------------------
# The worker process


class Injector:
    """Counts one worker's storage calls and fires its faults at the calls the schedule names.

    PostgreSQL: SQLAlchemy events on the storage's engine; a call is one RDBStorage method's frame
    (the outermost on the thread's stack), so a retried attempt is a new call. Journal: its
    storage class's methods wrapped. Every fault is written to the events file before it fires."""

    def __init__(self, job: dict) -> None:
        self.faults = [Fault(**f) for f in job["faults"] if f["call"]]
        self.counts: Counter[str] = Counter()
        self.locked_counts: Counter[str] = Counter()
        self.locked = False
        self.app = job["app"]
        self.events = os.open(job["events"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.local = threading.local()
        self.mutex = threading.Lock()

    def record(self, event: dict) -> None:
        os.write(self.events, (json.dumps(event) + "\n").encode())

    def begin(self, call: str) -> list[Fault]:
        """A new call of `call`: counted; the faults due at it."""
        with self.mutex:
            self.counts[call] += 1
            due = [f for f in self.faults if f.kind != "lock_drop" and f.call == call and f.n == self.counts[call]]
            if self.locked:
                self.locked_counts[call] += 1
                due += [
                    f
                    for f in self.faults
                    if f.kind == "lock_drop" and f.call == call and f.n == self.locked_counts[call]
                ]
            for f in due:
                self.faults.remove(f)
        return due

    def fire(self, fault: Fault, dbapi=None) -> None:
        try:
            if fault.kind == "lock_drop":
                if self._sql(
                    dbapi,
                    "SELECT pg_terminate_backend(l.pid) FROM pg_locks l JOIN pg_stat_activity a "
                    "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                    "AND a.application_name = %s AND a.datname = current_database() "
                    "AND l.pid <> pg_backend_pid()",
                    (self.app,),
                ):
                    self.record(dataclasses.asdict(fault))
                return
            if fault.phase == "after" and dbapi is not None:
                dbapi.commit()  # what the call wrote has landed
        except Exception:  # the connection is gone already (a restart): not injected; SQLAlchemy's own call fails
            return  # as it would (an error raised here, in its event, would reach the worker unwrapped)
        self.record(dataclasses.asdict(fault))
        if fault.kind in ("sigkill", "sigterm"):
            os.kill(os.getpid(), signal.SIGKILL if fault.kind == "sigkill" else signal.SIGTERM)
            return
        with contextlib.suppress(Exception):  # the server ends this very connection
            self._sql(dbapi, "SELECT pg_terminate_backend(pg_backend_pid())")

    @staticmethod
    def _sql(dbapi, statement: str, params=None) -> list:
        with dbapi.cursor() as cursor:
            cursor.execute(statement, params)
            return cursor.fetchall()

    def install(self, store) -> None:
        original = lock.budget_lock

        @contextlib.contextmanager
        def budget_lock(*args, **kwargs):
            with original(*args, **kwargs) as held:
                self.locked = True
                try:
                    yield held
                finally:
                    self.locked = False

        lock.budget_lock = budget_lock  # worker.next_trial looks it up on the module at each call
        if hasattr(store, "engine"):
            self._install_events(store.engine)
        else:
            self._wrap(type(store))

    def _install_events(self, engine) -> None:
        import optuna.storages._rdb.storage as rdb
        import sqlalchemy

        def current_call():
            frame, outermost = sys._getframe(), None
            while frame is not None:
                if frame.f_code.co_filename == rdb.__file__:
                    outermost = frame
                frame = frame.f_back
            return outermost

        def before(conn, cursor, statement, parameters, context, executemany):
            frame = current_call()
            if frame is None or frame is getattr(self.local, "frame", None):
                return
            self.local.frame = frame  # kept: a later call's frame can never be this object
            due = self.begin(frame.f_code.co_name)
            self.local.at_commit = [f for f in due if f.phase != "before"]
            for f in due:
                if f.phase == "before":
                    self.fire(f, conn.connection.dbapi_connection)

        def commit(conn):
            at_commit = getattr(self.local, "at_commit", [])
            if at_commit and current_call() is self.local.frame:
                self.local.at_commit = []
                for f in at_commit:
                    self.fire(f, conn.connection.dbapi_connection)

        sqlalchemy.event.listen(engine, "before_cursor_execute", before)
        sqlalchemy.event.listen(engine, "commit", commit)

    def _wrap(self, cls) -> None:
        def wrapped(name):
            method = getattr(cls, name)

            def call(storage, *args, **kwargs):
                due = self.begin(name)
                for f in due:
                    if f.phase == "before":
                        self.fire(f)
                result = method(storage, *args, **kwargs)
                for f in due:
                    if f.phase == "after":
                        self.fire(f)
                return result

            return call

        for name in JOURNAL_CALLS:
            setattr(cls, name, wrapped(name))


def work(job: dict, ready, go) -> None:
    """One worker process (the fork server's child): attach, install the faults, run the loop; its
    exit code the loop's, 130 after a signal, 1 when it gave up (RuntimeFailure), 3 on a crash."""
    out = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.environ.update(job["env"])
    logging.basicConfig(
        level=logging.INFO,
        force=True,
        format=f"%(asctime)s [worker {job['index']}, pid {os.getpid()}] %(levelname)s %(message)s",
    )
    injector = None
    code = 3
    try:
        if job["host"]:
            socket.gethostname = lambda: job["host"]  # another host: no process check, heartbeats only
        store = backends.open_storage(job["url"], create=False)
        study, config = studies.attach(store, job["url"], STUDY)
        w = worker.Worker(study, store, job["url"], config)
        injector = Injector(job)
        injector.install(store)
        signals.install_signal_handlers()
        ready.set()
        if go.wait(timeout=TIMEOUT):
            code = worker.run_loop(w, objective(config, job["seconds"]), poll_seconds=POLL)
    except KeyboardInterrupt as exc:
        logging.getLogger("nkat_search").warning("interrupted (%s)", exc)
        code = 130
    except RuntimeFailure as exc:
        logging.getLogger("nkat_search").error("%s", exc)
        code = 1
    except BaseException:
        traceback.print_exc()
    for sig in (signal.SIGTERM, signal.SIGINT):  # one sent (or raised again) after the loop ended is not handled
        signal.signal(sig, signal.SIG_IGN)
    if injector is not None:
        times = os.times()
        injector.record({"exit": code, "counts": injector.counts, "cpu": times.user + times.system})
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def objective(config: StudyConfig, seconds: float):
    def run(trial: optuna.Trial) -> float:
        params = space.suggest(trial, config)
        value = params["embed_dim"] + params["temperature"]
        time.sleep(seconds)
        trial.report(value, 1)
        if params["temperature"] < 0.7:  # a quarter of the trials end PRUNED
            raise optuna.TrialPruned(f"temperature {params['temperature']:.3f}")
        return value

    return run


# ---------------------------------------------------------------------------------------------
# The campaign


@dataclasses.dataclass
class Outcome:
    schedule: Schedule
    injected: list[Fault]
    missed: list[Fault]  # scheduled, never reached (the worker made fewer calls, or had ended)
    violations: list[str]
    seconds: float
    folder: Path
    twice: int = 0  # configurations queued again twice (see queued_twice)
    displaced: int = 0  # configurations left queued after a lost budget lock (see displaced)


# What a worker imports only when it opens a storage (the driver, SQLAlchemy's dialect, Optuna's
# schema check through alembic): imported once in the fork server instead of in every worker.
PRELOAD = (
    "psycopg",
    "sqlalchemy.dialects.postgresql.psycopg",
    "optuna.storages._rdb.models",
    "alembic.command",
    "alembic.migration",
    "alembic.script",
    "psutil",
    "filelock",
)

_context = None


def context():
    """The fork server, started once with the storage layer imported (a fork is then milliseconds)."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload([__name__, *PRELOAD])
    return _context


class Database:
    """One slot's PostgreSQL server and the database each of its schedules gets afresh.

    The server commits synchronously, as a production server does: the test suite's servers do
    not (synchronous_commit = off), and an immediate stop there loses commits already acknowledged,
    which no client can be expected to survive."""

    def __init__(self, server) -> None:
        self.server = server
        server.query("ALTER SYSTEM SET synchronous_commit = on")
        server.query("SELECT pg_reload_conf()")
        template = server.create_database("faults_template")
        store = backends.open_storage(template)  # Optuna's schema, once: each schedule copies it
        store.engine.dispose()  # no connection may stay on a template

    def fresh(self) -> str:
        if not self.server.running:
            self.server.start()
        self.server.drop_database(STUDY)
        self.server.query(f"CREATE DATABASE {STUDY} TEMPLATE faults_template")
        return self.server.url(STUDY)


def run_schedule(schedule: Schedule, folder: Path, database: Database | None = None) -> Outcome:
    """Run one schedule's workers and faults to the end; its invariants checked."""
    started = time.monotonic()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    url = database.fresh() if database else f"journal:{folder / 'study.journal'}"
    store = backends.open_storage(url)
    study = studies.create_or_resume(store, url, study_config(schedule), schedule.budget)
    env = {
        "NKAT_SEARCH_HEARTBEAT_INTERVAL": str(schedule.interval),
        "NKAT_SEARCH_GRACE_PERIOD": str(schedule.grace),
        "NKAT_SEARCH_DB_RETRY_SECONDS": str(schedule.retry),
    }
    ctx = context()
    go, readies, procs = ctx.Event(), [], []
    for i in range(schedule.workers):
        job = {
            "index": i,
            "url": f"{url}?application_name=w{i}" if database else url,
            "app": f"w{i}",
            "log": str(folder / f"worker-{i}.log"),
            "events": str(folder / f"events-{i}.jsonl"),
            "env": env,
            "host": f"host-{i}" if schedule.hosts == "many" else "",
            "seconds": schedule.seconds,
            "faults": [dataclasses.asdict(f) for f in schedule.faults if f.worker == i],
        }
        readies.append(ctx.Event())
        procs.append(ctx.Process(target=work, args=(job, readies[-1], go), daemon=True))
        with _polling:  # start() polls every child multiprocessing knows
            procs[-1].start()
    violations: list[str] = []
    sent: dict[int, str] = {}
    injected: list[Fault] = []
    try:
        for i, (proc, ready) in enumerate(zip(procs, readies)):
            while not ready.wait(0.2):
                if exit_code(proc) is not None or time.monotonic() - started > TIMEOUT:
                    log = tail(folder / f"worker-{i}.log")
                    raise RuntimeError(f"worker {i} did not attach (exit code {exit_code(proc)})\n{log}")
        go.set()
        start = time.monotonic()
        for fault in sorted((f for f in schedule.faults if not f.call), key=lambda f: f.at):
            time.sleep(max(0.0, start + fault.at - time.monotonic()))
            if fault.kind == "restart":
                database.server.stop(fault.mode)
                injected.append(fault)
                time.sleep(fault.down)
                database.server.start()
            elif exit_code(procs[fault.worker]) is None:
                sent[fault.worker] = fault.kind
                injected.append(fault)
                os.kill(procs[fault.worker].pid, signal.SIGKILL if fault.kind == "sigkill" else signal.SIGTERM)
        wait(procs, start + TIMEOUT)
    finally:
        hung = [i for i, proc in enumerate(procs) if exit_code(proc) is None]
        for i in hung:
            procs[i].kill()
        wait(procs, time.monotonic() + TIMEOUT)
        if database and not database.server.running:
            database.server.start()
    for i, code in enumerate(exit_code(proc) for proc in procs):
        events = read_events(folder / f"events-{i}.jsonl")
        fired = [Fault(**e) for e in events if "kind" in e]
        injected += fired
        kinds = {f.kind for f in fired} | ({sent[i]} if i in sent else set())
        reported = next((e["exit"] for e in events if "exit" in e), None)
        if i in hung:
            violations.append(f"worker {i} did not end within {TIMEOUT:.0f} s of the start (hung)")
        elif code == -signal.SIGKILL:
            if "sigkill" not in kinds:
                violations.append(f"worker {i} was killed by no fault of this schedule")
        elif reported != code or code not in ({0, 130} if "sigterm" in kinds else {0}):
            violations.append(f"worker {i} exited {code}" + (" after SIGTERM" if "sigterm" in kinds else ""))
    trials = study.get_trials(deepcopy=False)
    violations += check(trials, schedule.budget)
    if violations:  # the study as it ended, beside the logs (the database is dropped for the next schedule)
        (folder / "trials.json").write_text(
            json.dumps(
                [
                    {
                        "number": t.number,
                        "state": t.state.name,
                        "params": t.params,
                        "user_attrs": t.user_attrs,
                        "system_attrs": t.system_attrs,
                        "start": str(t.datetime_start),
                        "complete": str(t.datetime_complete),
                    }
                    for t in trials
                ],
                indent=1,
                default=str,
            )
        )
    if hasattr(store, "engine"):
        store.engine.dispose()
    missed = [f for f in schedule.faults if f not in injected]
    return Outcome(
        schedule,
        injected,
        missed,
        violations,
        time.monotonic() - started,
        folder,
        queued_twice(trials),
        len(displaced(trials)),
    )


# multiprocessing's Popen.poll is not thread-safe: when two threads poll one process (every
# Process.start polls all the children it knows) and both see it end, the second reads its exit
# code as 255. Every poll of the campaign's processes holds this lock, and none blocks.
_polling = threading.Lock()


def exit_code(proc) -> int | None:
    with _polling:
        return proc.exitcode


def wait(procs: list, deadline: float) -> None:
    """Until every process has ended or the deadline (time.monotonic()) has passed."""
    while any(exit_code(proc) is None for proc in procs) and time.monotonic() < deadline:
        time.sleep(0.05)


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def configuration(trial: optuna.trial.FrozenTrial) -> dict:
    """What a trial was handed: its parameters, or the queue's fixed parameters if it never ran."""
    return dict(trial.params) or dict(trial.system_attrs.get("fixed_params") or {})


def check(trials: list[optuna.trial.FrozenTrial], budget: int) -> list[str]:
    """The invariants of a study after its workers ended, one sentence per violation."""
    out = []
    finished = sum(t.state in FINISHED for t in trials)
    if finished != budget:
        out.append(f"{finished} trials finished (COMPLETE or PRUNED), not the budget of {budget}")
    kept = {t.number for t in displaced(trials)}
    left = [
        f"{t.number} {t.state.name}"
        for t in trials
        if t.state in (TrialState.RUNNING, TrialState.WAITING) and t.number not in kept
    ]
    if left:
        out.append(f"trials left unfinished: {', '.join(left)}")
    twice = sorted(n for n, c in Counter(t.number for t in trials).items() if c > 1)
    if twice:
        out.append(f"trial numbers twice: {twice}")
    retries: dict[int, list[optuna.trial.FrozenTrial]] = {}
    for t in trials:
        if t.system_attrs.get("retry_history"):
            retries.setdefault(t.system_attrs["retry_history"][-1], []).append(t)
    for t in trials:
        if t.state != TrialState.FAIL:
            continue
        reason = t.user_attrs.get("fail_reason")
        if not reason:
            out.append(f"trial {t.number} FAILED without a fail_reason")
        elif not reason.startswith(REASONS):
            out.append(f"trial {t.number} FAILED for a reason no fault explains: {reason[:300]}")
        handed = configuration(t)
        again = retries.get(t.number, [])
        if not handed or len([*t.system_attrs.get("retry_history", []), t.number]) > retrying.MAX_RETRY:
            continue  # nothing to lose, or given up by design after MAX_RETRY retries
        if not again:
            out.append(f"trial {t.number} FAILED ({reason}) and its configuration {handed} was not queued again")
        elif not handed.items() <= configuration(again[0]).items():
            out.append(f"trial {again[0].number} retries trial {t.number} with {configuration(again[0])}, not {handed}")
        elif again[0].user_attrs.get("retry_of") != t.system_attrs.get("failed_trial", t.number):
            out.append(f"trial {again[0].number} retries trial {t.number} without retry_of naming the original")
    return out


def displaced(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """WAITING trials left that queue again a trial given back after a lost budget lock.

    While a worker's lock is lost unnoticed, another worker may ask at the same time: when the
    first took the queue's last entry and the second then drew a new point, the first gives its
    entry back (worker.next_trial), and the new point fills the budget. The configuration stays
    queued, not lost: it runs first once the budget is raised. An exact budget and a queue always
    emptied cannot both hold while a lock can be lost unnoticed."""
    numbers = {t.number: t for t in trials}
    return [
        t
        for t in trials
        if t.state == TrialState.WAITING
        and t.system_attrs.get("retry_history")
        and numbers.get(t.system_attrs["retry_history"][-1]) is not None
        and numbers[t.system_attrs["retry_history"][-1]].user_attrs.get("fail_reason") == LOST_LOCK
    ]


def queued_twice(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Failed trials queued again more than once (their configuration runs twice: no loss, a trial
    of the budget spent again), as when the reply of a retry's creation is lost and Optuna's
    _create_new_trial creates it again."""
    retried = Counter(t.system_attrs["retry_history"][-1] for t in trials if t.system_attrs.get("retry_history"))
    return sum(n > 1 for n in retried.values())


def run_campaign(
    schedules: list[Schedule], folder: Path, jobs: int = 6, launch=None, keep: bool = False, progress=None
) -> list[Outcome]:
    """Run the schedules, `jobs` at a time, each PostgreSQL slot on a server of its own (launch():
    tests/pg_server.launch by default); a schedule's folder (logs, events) is kept where it failed."""
    if multiprocessing.parent_process() is not None:  # a worker that ran its parent's unguarded main again
        raise RuntimeError("run_campaign in a child process: guard the main module with `if __name__ == '__main__'`")
    if launch is None:
        launch = _pg_server().launch
    slots = jobs if any(s.storage == "postgresql" for s in schedules) else 0
    servers: list = []
    lock_free = threading.Lock()
    try:
        with ThreadPoolExecutor(max_workers=max(slots, 1)) as pool:  # initdb and the schema, all at once
            started = [pool.submit(launch) for _ in range(slots)]
        servers = [f.result() for f in started if f.exception() is None]
        for f in started:
            if f.exception() is not None:
                raise f.exception()
        with ThreadPoolExecutor(max_workers=max(slots, 1)) as pool:
            free = list(pool.map(Database, servers))

        def one(index: int) -> Outcome:
            schedule, where = schedules[index], folder / f"{schedules[index].storage}-{schedules[index].seed}-{index}"
            database = None
            if schedule.storage == "postgresql":
                with lock_free:
                    database = free.pop()
            try:
                outcome = run_schedule(schedule, where, database)
            except Exception:
                failure = f"the campaign failed: {traceback.format_exc()[-3000:]}"
                outcome = Outcome(schedule, [], [], [failure], 0.0, where)
            finally:
                if database is not None:
                    with lock_free:
                        free.append(database)
            if not outcome.violations and not keep:
                shutil.rmtree(outcome.folder, ignore_errors=True)
            if progress is not None:
                progress(outcome)
            return outcome

        # The dearest first, so that no long schedule starts last; the outcomes in the schedules' order.
        dear = sorted(range(len(schedules)), key=lambda i: (-cost(schedules[i]), i))
        pool = ThreadPoolExecutor(max_workers=jobs)
        try:
            running = {i: pool.submit(one, i) for i in dear}
            done = {i: future.result() for i, future in running.items()}
        finally:  # stopped (Ctrl-C, SIGTERM): the schedules under way end, the others never start
            pool.shutdown(cancel_futures=True)
        return [done[i] for i in range(len(schedules))]
    finally:
        with ThreadPoolExecutor(max_workers=max(len(servers), 1)) as pool:
            list(pool.map(lambda server: server.destroy(), servers))


def cost(schedule: Schedule) -> int:
    """A rough rank of a schedule's wall time: a journal worker killed at a moment may die holding
    the journal's file lock, which the others then wait out (Optuna's JournalFileOpenLock: 30 s);
    a restart waits out the back-off; PostgreSQL costs more than the journal."""
    if schedule.storage == "journal":
        return 3 if any(f.kind == "sigkill" and not f.call for f in schedule.faults) else 0
    return 2 if any(f.kind == "restart" for f in schedule.faults) else 1


def _pg_server():
    """tests/pg_server.py, the test suite's throwaway server (initdb and pg_ctl as `postgres` under root)."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import pg_server

    return pg_server


def figures(outcomes: list[Outcome], seconds: float) -> str:
    """Schedules run, faults injected by kind, violations with the command that reproduces each."""
    storages = Counter(o.schedule.storage for o in outcomes)
    injected = Counter(f.kind for o in outcomes for f in o.injected)
    missed = sum(len(o.missed) for o in outcomes)
    failed = [o for o in outcomes if o.violations]
    lines = [
        f"schedules run: {len(outcomes)} ({', '.join(f'{k} {v}' for k, v in sorted(storages.items()))}) "
        f"in {seconds:.0f} s",
        "faults injected: "
        + ", ".join(f"{k} {injected[k]}" for k in ALL_KINDS)
        + f" ({sum(injected.values())} in all; {missed} scheduled but not reached)",
        f"configurations queued again twice (run twice, none lost): {sum(o.twice for o in outcomes)}; "
        f"left queued after a lost budget lock: {sum(o.displaced for o in outcomes)}",
        f"violations: {sum(len(o.violations) for o in failed)}" + (f" in {len(failed)} schedules" if failed else ""),
    ]
    for o in failed:
        lines += [
            f"- {o.schedule}",
            *(f"    {v}" for v in o.violations),
            f"    logs: {o.folder}",
            f"    reproduce: {o.schedule.command}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, help="run this one schedule (with --storage) and show its faults")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="with --seed: run it this many times (the interleaving of the workers varies)",
    )
    parser.add_argument("--schedules", type=int, default=100, help="how many schedules (seeds from --first-seed)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument(
        "--storage",
        choices=("postgresql", "journal", "both"),
        default="both",
        help="both: seeds 4k+3 on the journal, the others on PostgreSQL",
    )
    parser.add_argument(
        "--jobs", type=int, default=6, help="schedules at a time (on PostgreSQL each on a server of its own)"
    )
    parser.add_argument("--folder", help="where the schedules' logs go (kept for violations; default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep every schedule's logs")
    args = parser.parse_args(argv)
    if args.seed is not None:
        storage = "postgresql" if args.storage == "both" else args.storage
        schedules = [draw(args.seed, storage)] * args.repeat
        args.jobs = min(args.jobs, args.repeat)
    else:
        seeds = range(args.first_seed, args.first_seed + args.schedules)
        schedules = [
            draw(s, args.storage if args.storage != "both" else ("journal" if s % 4 == 3 else "postgresql"))
            for s in seeds
        ]
    folder = Path(args.folder or tempfile.mkdtemp(prefix="nkat-faults-"))
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = []

    def progress(outcome: Outcome) -> None:
        done.append(outcome)
        if args.seed is not None or outcome.violations or len(done) % 50 == 0:
            state = "VIOLATED" if outcome.violations else "ok"
            print(
                f"[{len(done)}/{len(schedules)}] {state} {outcome.schedule} ({outcome.seconds:.1f} s; injected: "
                f"{'; '.join(map(str, outcome.injected)) or 'none'})",
                flush=True,
            )

    # SIGTERM ends the campaign as Ctrl-C does: its servers are stopped and removed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.monotonic()
    try:
        outcomes = run_campaign(
            schedules, folder, args.jobs, keep=args.keep or args.seed is not None, progress=progress
        )
    except KeyboardInterrupt:  # Ctrl-C: run_campaign has stopped and removed its servers on the way out
        print(f"interrupted after {len(done)} of {len(schedules)} schedules; logs: {folder}", file=sys.stderr)
        return 130
    print(figures(outcomes, time.monotonic() - started))
    if args.seed is not None:
        print(f"logs: {folder}")
    return 1 if any(o.violations for o in outcomes) else 0


if __name__ == "__main__":
    # The fork server's children import this module by its name (their target is faults.work); with
    # no spec, multiprocessing does not run it again in each of them as __mp_main__ (runpy warns).
    __spec__ = None
    from benchmarks.faults import main as run

    sys.exit(run())
