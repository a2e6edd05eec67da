"""What several test modules share: the tiny study, running the CLI as a user would, waiting,
the exact-budget check, and the storage-layer worker harness (worker processes with a trivial
objective, no torch). Test modules import from here, never from each other."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import sqlalchemy.exc
from optuna.trial import TrialState

from nkat_search.search import studies
from nkat_search.search.study_file import load_study
from nkat_search.storage import backends

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

# How a command ends that Ctrl-C interrupted: exit status 130 from our handler, or death by SIGINT
# after the same clean shutdown and the same one line. CPython ends a process the second way when it
# has marked a KeyboardInterrupt as unhandled (its _Py_UnhandledKeyboardInterrupt flag), and it can
# mark one that our handler caught: measured with `bench` interrupted 1.5 s and 6 s in, the flag was
# set at exit in about one run of ten. A shell reports both as status 130.
INTERRUPTED = (130, -signal.SIGINT)

ROOT = Path(__file__).resolve().parent.parent

TINY_STUDY = """
[study]
name = "{name}"
trials = {trials}

[sampler]
kind = "tpe"
seed = 0
n_startup_trials = 2

[pruner]
kind = "none"

[stage1]
dataset = "cifar10"
epochs = 1
gate = {gate}

[stage2]
datasets = ["mnist"]
epochs = 1

[data]
source = "synthetic"
val_size = 64
synthetic_train = 192
synthetic_test = 64

[model]
num_heads = 2

[train]
batch_size = 64
warmup = 0

[report]
epochs = 1

[space.embed_dim]
type = "int"
low = 8
high = 16
step = 8

[space.temperature]
type = "float"
low = 0.6
high = 1.0
"""


def child_signals() -> None:
    """preexec_fn of a child a test signals: SIGINT and SIGTERM at their defaults, whatever the test
    run inherited. Under `nohup` or a background job SIGINT is ignored, an ignored signal stays
    ignored across exec, and Python installs no KeyboardInterrupt handler for it: the child would
    never see the Ctrl-C the test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def cli(*args: str, env: dict | None = None, timeout: float = 300, cwd=None) -> subprocess.CompletedProcess:
    """Run `nkat-search ARGS` in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "nkat_search.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd or ROOT,
    )


def spawn(*args: str, env: dict | None = None, cwd=None) -> subprocess.Popen:
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "nkat_search.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        preexec_fn=child_signals,
    )


def unavailable(reason: str) -> None:
    """Skip a test whose component cannot run here, except under CI (env CI set, as scripts/test.sh
    sets it): the test command installs every component a test needs, so there it fails instead."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason} (CI is set: scripts/test.sh installs it, so this test must run)", pytrace=False)
    pytest.skip(reason)


def wait_for(predicate, what: str, timeout: float = 120, proc: subprocess.Popen | None = None):
    """predicate()'s first truthy value, polled; fails the test after timeout seconds, or at once when
    proc (the process under test) has exited first."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            if proc is not None:
                proc.kill()
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{proc.communicate()[0]}")
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)
    return value


def with_stage1_epochs(path: str, epochs: int) -> str:
    """The tiny study file at path, rewritten to train `epochs` epochs in stage 1."""
    text = Path(path).read_text().replace("epochs = 1\ngate", f"epochs = {epochs}\ngate")
    Path(path).write_text(text)
    return path


def assert_exact_budget(study: optuna.Study, budget: int) -> list[optuna.trial.FrozenTrial]:
    """The study holds exactly its budget of finished trials, nothing RUNNING or WAITING, no number twice."""
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    assert sum(t.state in FINISHED for t in trials) == budget, states
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)], states
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), numbers
    return trials


# Worker processes: the script imports the storage layer once and forks one child per job (fast on
# a busy machine; nothing is connected before the fork), each of which attaches to the study and
# runs run_loop with a trivial objective (params from space.suggest, `seconds` of sleep split over
# `steps` reports) and writes its log to its own file. Without "grace" a child opens the storage as
# the CLI does; with "grace" and "retry" it builds RetryingRDBStorage with those settings itself.
# "ready"/"go" are files of a start barrier, so that every child takes part. The exit codes come
# back as one JSON line.
WORKERS = """
import json, logging, os, sys, time, traceback
import optuna
from nkat_search.search import space, studies, worker as wk
from nkat_search.storage import backends, retrying


def work(args):
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [pid {os.getpid()}] %(message)s")
    url = args["url"]
    if "grace" in args:
        store = retrying.RetryingRDBStorage(url, args["retry"], engine_kwargs={"pool_pre_ping": True},
                                      heartbeat_interval=1, grace_period=args["grace"],
                                      heartbeat_stale_trial_callback=retrying.retry)
    else:
        store = backends.open_storage(url, create=False)
    study, config = studies.attach(store, url, args["study"])
    w = wk.Worker(study, store, url, config)

    def objective(trial):
        params = space.suggest(trial, config)
        value = float(params["embed_dim"]) + params["temperature"]
        for step in range(1, args["steps"] + 1):
            time.sleep(args["seconds"] / args["steps"])
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    open(args["ready"], "w").close()
    while not os.path.exists(args["go"]):
        time.sleep(0.05)
    code = wk.run_loop(w, objective, poll_seconds=0.2)
    if "torch" in sys.modules:
        print("the storage layer imported torch", flush=True)
        return 3
    return code


children = {}
for i, args in enumerate(json.loads(sys.argv[1])):
    pid = os.fork()
    if pid == 0:
        log = os.open(args["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        code = 1
        try:
            code = work(args)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    children[pid] = i
codes = [None] * len(children)
while children:
    pid, status = os.wait()
    codes[children.pop(pid)] = os.waitstatus_to_exitcode(status)
print(json.dumps(codes), flush=True)
"""


def create_study(url: str, path: str, budget: int) -> optuna.Study:
    """The study of the tiny study file in the storage at url, with its budget recorded."""
    return studies.create_or_resume(backends.open_storage(url), url, load_study(path), budget)


class Workers:
    """count worker processes (the WORKERS script) released together; each logs to its own file."""

    def __init__(
        self,
        count: int,
        url: str | list[str],
        folder: Path,
        study: str = "tiny",
        seconds: float = 0.0,
        steps: int = 1,
        env: dict | None = None,
        **storage_options,
    ) -> None:
        urls = url if isinstance(url, list) else [url] * count
        self.folder, self.go, self.count = folder, folder / "go", count
        jobs = [
            {
                "url": urls[i],
                "study": study,
                "seconds": seconds,
                "steps": steps,
                "log": str(self.log(i)),
                "ready": str(folder / f"ready-{i}"),
                "go": str(self.go),
                **storage_options,
            }
            for i in range(count)
        ]
        # Its own session, so that a timeout can kill the launcher and every child at once.
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKERS, json.dumps(jobs)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            preexec_fn=child_signals,
        )

    def log(self, i: int) -> Path:
        return self.folder / f"worker-{i}.log"

    def release(self, timeout: float = 300) -> None:
        """Wait until every process has attached, then let them all run."""
        deadline = time.monotonic() + timeout
        while sum((self.folder / f"ready-{i}").exists() for i in range(self.count)) < self.count:
            assert self.proc.poll() is None, f"workers exited before the start\n{self.output()}"
            assert time.monotonic() < deadline, f"workers did not attach in time\n{self.output()}"
            time.sleep(0.1)
        self.go.touch()

    def wait(self, timeout: float) -> list[int]:
        """Exit codes of the workers; if they have not all ended after timeout, they are killed and the test fails."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"workers did not end within {timeout:.0f} s\n{self.output()}")
        assert self.proc.returncode == 0, out
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()

    def output(self, tail: int = 4000) -> str:
        return "\n".join(
            f"--- worker {i} ---\n" + (self.log(i).read_text()[-tail:] if self.log(i).exists() else "")
            for i in range(self.count)
        )


def worker_groups(tmp_path: Path):
    """The workers fixture: start(count, url, ...) gives a Workers group; any still running at the end are killed."""
    started: list[Workers] = []

    def start(count: int, url, **options) -> Workers:
        folder = tmp_path / f"workers-{len(started)}"
        folder.mkdir()
        started.append(Workers(count, url, folder, **options))
        return started[-1]

    yield start
    for group in started:
        group.kill()


def dropped_connection(statement: str = "COMMIT") -> sqlalchemy.exc.OperationalError:
    """The error SQLAlchemy raises when the server closed the connection (psycopg's wording)."""
    return sqlalchemy.exc.OperationalError(
        statement, {}, Exception("consuming input failed: server closed the connection unexpectedly")
    )


def storage_call() -> str | None:
    """The RDBStorage method that the application called, on the current stack (inside an SQLAlchemy event)."""
    import optuna.storages._rdb.storage as rdb

    frame, outermost = sys._getframe(), None
    while frame is not None:
        if frame.f_code.co_filename == rdb.__file__:
            outermost = frame.f_code.co_name
        frame = frame.f_back
    return outermost


def lose_the_reply_of_the_first_new_trial(store) -> list[float]:
    """Make the first `_create_new_trial` of `store` commit, then drop its connection before the
    reply (as a server that went away after its COMMIT): Optuna tries again and creates a second
    trial, the first left RUNNING with no owner. Returns the list that gets the moment it happened."""
    lost: list[float] = []

    def commit_then_lose_the_reply(conn):
        if not lost and storage_call() == "_create_new_trial":
            conn.connection.dbapi_connection.commit()
            lost.append(time.monotonic())
            raise dropped_connection("COMMIT")

    sqlalchemy.event.listen(store.engine, "commit", commit_then_lose_the_reply)
    return lost
