"""Faults against a real PostgreSQL while workers share a budget: every client connection dropped
again and again with a worker SIGKILLed meanwhile, a reply lost after a committed create_new_trial,
the budget lock's connection dropped while its holder asks, and an outage longer than the heartbeat
grace period. Each ends with exactly the budget of finished trials, none RUNNING, no trial number
twice, and every FAIL with its reason."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from helpers import (
    ROOT,
    assert_exact_budget,
    cli,
    create_study,
    lose_the_reply_of_the_first_new_trial,
    storage_call,
    wait_for,
    worker_groups,
)
from optuna.trial import TrialState

from nkat_search.search import studies
from nkat_search.search.space import suggest
from nkat_search.search.study_file import load_study
from nkat_search.search.worker import Worker, next_trial, run_loop, run_trial
from nkat_search.storage import backends, retrying

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.optuna_api]


@pytest.fixture
def workers(tmp_path):
    yield from worker_groups(tmp_path)


class Chaos:
    """Drops every client connection of one database every `period` seconds, in a thread, until
    stopped or for `duration` seconds of unpaused time (pause: clear `running`). Counts the rounds
    that dropped any connection, and the connections dropped."""

    def __init__(self, server, dbname: str, period: float, duration: float) -> None:
        self.server, self.dbname, self.period, self.duration = server, dbname, period, duration
        self.stopped, self.running = threading.Event(), threading.Event()
        self.rounds, self.dropped, self.active = 0, 0, 0.0
        self.running.set()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while self.active < self.duration and not self.stopped.wait(self.period):
            if self.running.is_set():
                self.active += self.period
                ended = self.server.terminate_backends(self.dbname)
                self.rounds += ended > 0
                self.dropped += ended

    def __enter__(self) -> "Chaos":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()


def worker_process(url: str, log: Path) -> subprocess.Popen:
    """`nkat-search worker` with its output in a file (a pipe nobody reads would fill up and block it)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "nkat_search.cli", "worker", "--storage", url],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=dict(os.environ),
        )


def owners_of_running_trials(url: str) -> dict[int, int]:
    """{trial number: worker pid} of the RUNNING trials that have parameters, read with plain SQL
    (a connection of the test may be dropped too: then nothing is known this time)."""
    import psycopg
    from pg_server import PASSWORD, USER

    dbname = url.rsplit("/", 1)[1]
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD, dbname=dbname) as conn:
            rows = conn.execute(
                "SELECT t.number, a.value_json FROM trials t JOIN trial_user_attributes a USING (trial_id) "
                "WHERE t.state = 'RUNNING' AND a.key = 'worker' "
                "AND EXISTS (SELECT 1 FROM trial_params p WHERE p.trial_id = t.trial_id)"
            ).fetchall()
    except psycopg.OperationalError:
        return {}
    return {number: int(json.loads(owner).rpartition(":")[2]) for number, owner in rows}


def run_in_thread(call, timeout: float):
    """call()'s result; fails the test if it raises or has not returned after timeout seconds."""
    outcome = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # re-raised below, in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the worker did not end within {timeout} s (waiting forever?)"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def running(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's RUNNING trials."""
    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


@pytest.mark.long
def test_workers_keep_the_budget_while_connections_drop_every_few_seconds_and_one_is_killed(
    pg_server, pg_url, tiny_study, tmp_path
):
    # Tiny trials of 3 epochs, a second or a few each: two workers need half a minute or more for
    # the budget, and every connection of the database is dropped every 2 s for 30 s of that. (With
    # 20 trials a quiet machine finished the budget before a worker could be caught inside a trial.)
    budget = 36
    path = tiny_study(trials=budget)
    Path(path).write_text(Path(path).read_text().replace("epochs = 1\ngate", "epochs = 3\ngate"))
    started = cli("start", "--study", path, "--workers", "0", "--storage", pg_url)
    assert started.returncode == 0, started.stderr
    logs = [tmp_path / f"worker-{i}.log" for i in range(3)]
    procs = [worker_process(pg_url, logs[0]), worker_process(pg_url, logs[1])]
    codes = {}
    try:
        wait_for(lambda: owners_of_running_trials(pg_url), "a running trial", timeout=180)
        with Chaos(pg_server, pg_url.rsplit("/", 1)[1], period=2, duration=30) as chaos:
            time.sleep(3)
            # On a loaded machine both workers can spend all the drops waiting for the database,
            # outside any trial: up to three minutes to catch one inside a trial.
            victim = wait_for(
                lambda: [p for p in procs if p.pid in owners_of_running_trials(pg_url).values()],
                "a worker inside a trial",
                timeout=180,
            )[0]
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            # Opening a storage fails fast by design (a worker that cannot connect at its start says
            # so and exits 2), so the drops pause while the replacement starts and attaches.
            chaos.running.clear()
            procs.append(worker_process(pg_url, logs[2]))
            wait_for(
                lambda: " on cpu: study " in logs[2].read_text() or procs[2].poll() is not None,
                "the replacement to attach",
                timeout=180,
            )
            chaos.running.set()
            deadline = time.monotonic() + 400
            while len(codes) < 2 and time.monotonic() < deadline:
                codes = {i: p.returncode for i, p in enumerate(procs) if p is not victim and p.poll() is not None}
                time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = "\n".join(f"--- worker {i} (pid {p.pid}) ---\n{logs[i].read_text()[-5000:]}" for i, p in enumerate(procs))
    assert len(codes) == 2, f"the workers did not end by themselves\n{outputs}"
    assert list(codes.values()) == [0, 0], outputs
    assert "Traceback" not in outputs, outputs
    assert chaos.rounds >= 5, f"the chaos dropped connections only {chaos.rounds} times"
    study = optuna.load_study(study_name="tiny", storage=backends.open_storage(pg_url))
    trials = assert_exact_budget(study, budget)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    summary = (
        f"chaos: {chaos.rounds} rounds dropped {chaos.dropped} connections in {chaos.active:.0f} s; FAIL: "
        + "; ".join(f"{t.number}: {t.user_attrs.get('fail_reason')}" for t in failed)
    )
    print("\n" + summary)
    assert all(t.user_attrs.get("fail_reason") for t in failed), summary
    assert [t for t in failed if t.user_attrs.get("worker", "").endswith(f":{victim.pid}")], summary
    # A dropped connection is waited out: no trial ends with a storage error as its reason, and
    # each failed trial with parameters (the victim's) ran again.
    storage_errors = ("StorageInternalError", "OperationalError", "InterfaceError", "StorageUnavailable")
    assert not [t for t in failed if t.user_attrs["fail_reason"].startswith(storage_errors)], summary
    retried = {t.system_attrs["retry_history"][-1] for t in trials if "retry_history" in t.system_attrs}
    assert {t.number for t in failed if t.params} <= retried, summary


def test_a_lost_reply_after_a_committed_new_trial_leaves_an_orphan_that_is_failed_and_the_budget_kept(
    pg_url, tiny_study
):
    # The server commits the new trial and the connection drops before the reply arrives: the
    # worker cannot know the trial exists (Optuna's _create_new_trial tries again and makes
    # another). The first is RUNNING with no owner and no heartbeat: after the grace period a
    # worker fails it with its reason, and the budget is still exact.
    config = load_study(tiny_study())
    store = backends.open_storage(pg_url)
    study = studies.create_or_resume(store, pg_url, config, 3)
    lost = lose_the_reply_of_the_first_new_trial(store)
    w = Worker(study, store, pg_url, config)
    assert run_in_thread(lambda: run_loop(w, lambda t: sum(suggest(t, config).values()), poll_seconds=0.2), 90) == 0
    assert lost, "the fault was not injected"
    assert time.monotonic() - lost[0] >= 6  # the orphan was not judged before its grace period
    trials = assert_exact_budget(study, 3)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [(t.params, t.user_attrs) for t in failed] == [
        ({}, {"fail_reason": "no owner and no heartbeat for 6 s (its worker died or lost the reply while claiming it)"})
    ]


class WorkerDied(BaseException):
    """A worker process gone at one line (SIGKILL, a lost host): nothing after it runs."""


@pytest.mark.parametrize(
    "dies_at, reason",
    [
        ("record_heartbeat", "no owner and no heartbeat for 6 s (its worker died or lost the reply while claiming it)"),
        ("worker_id", "no heartbeat from worker (unknown) for 6 s"),
    ],
)
@pytest.mark.long
def test_a_worker_that_dies_while_claiming_its_trial_leaves_no_trial_running_for_ever(
    pg_url, tiny_study, monkeypatch, dies_at, reason
):
    # A worker dies after `ask` and before it recorded its trial's first heartbeat, or after the
    # heartbeat and before its owner: another worker, on any host (so no process check helps), must
    # still fail that trial after the grace period and finish the budget.
    config = load_study(tiny_study())
    store = backends.open_storage(pg_url)
    study = studies.create_or_resume(store, pg_url, config, 2)

    def die(*args, **kwargs):
        raise WorkerDied(dies_at)

    with monkeypatch.context() as m:
        if dies_at == "record_heartbeat":
            m.setattr(store, "record_heartbeat", die)
        else:
            m.setattr("nkat_search.search.worker.worker_id", die)
        with pytest.raises(WorkerDied):
            next_trial(Worker(study, store, pg_url, config))
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]
    other_store = backends.open_storage(pg_url)
    other = Worker(studies.attach(other_store, pg_url, "tiny")[0], other_store, pg_url, config)
    assert run_in_thread(lambda: run_loop(other, lambda t: sum(suggest(t, config).values()), poll_seconds=0.2), 90) == 0
    trials = assert_exact_budget(study, 2)
    assert [(t.number, t.user_attrs.get("fail_reason")) for t in trials if t.state == TrialState.FAIL] == [(0, reason)]


def test_without_optunas_stale_trial_query_a_dead_workers_trial_is_still_failed_and_retried(
    pg_url, tiny_study, monkeypatch
):
    # Should an Optuna release rename the private query of stale trials, the worker falls back to
    # the public optuna.storages.fail_stale_trials: the trial is failed and queued again, without
    # its reason. Its worker (this process: no process check applies) claims it and is gone.
    config = load_study(tiny_study())
    store = backends.open_storage(pg_url)
    study = studies.create_or_resume(store, pg_url, config, 2)
    abandoned = next_trial(Worker(study, store, pg_url, config))
    params = suggest(abandoned, config)
    monkeypatch.setattr(retrying, "stale_trial_ids", lambda storage, study_id: None)
    other_store = backends.open_storage(pg_url)
    other = Worker(studies.attach(other_store, pg_url, "tiny")[0], other_store, pg_url, config)
    assert run_in_thread(lambda: run_loop(other, lambda t: sum(suggest(t, config).values()), poll_seconds=0.2), 90) == 0
    trials = assert_exact_budget(study, 2)
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [abandoned.number]
    assert [t.params for t in trials if t.user_attrs.get("retry_of") == abandoned.number] == [params]


def test_a_dropped_lock_connection_while_asking_does_not_overrun_the_budget(pg_server, pg_url, tiny_study):
    # Worker A holds the budget lock and is about to create the last trial when its lock
    # connection drops (idle while held, so A cannot notice). Worker B takes the lock and asks
    # the same last slot; then A goes on.
    config = load_study(tiny_study())
    urls = {name: f"{pg_url}?application_name={name}" for name in "ab"}  # separate lock connections
    stores = {name: backends.open_storage(url) for name, url in urls.items()}
    studies.create_or_resume(stores["a"], urls["a"], config, 1)

    def worker(name: str) -> Worker:
        return Worker(studies.attach(stores[name], urls[name], "tiny")[0], stores[name], urls[name], config)

    def objective(trial) -> float:
        return sum(suggest(trial, config).values())

    a, b, b_ran = worker("a"), worker("b"), []

    def drop_a_lock_then_let_b_ask(conn, cursor, statement, parameters, context, executemany):
        if not b_ran and storage_call() == "_create_new_trial":
            holders = [
                pid for (pid,) in pg_server.query("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted")
            ]
            assert pg_server.terminate_backends(pg_url.rsplit("/", 1)[1], pids=holders) == 1
            trial = next_trial(b)
            b_ran.append(run_trial(b, trial, objective) if isinstance(trial, optuna.Trial) else trial)

    sqlalchemy.event.listen(stores["a"].engine, "before_cursor_execute", drop_a_lock_then_let_b_ask)
    assert run_in_thread(lambda: run_loop(a, objective, poll_seconds=0.2), 60) == 0
    assert b_ran, "the fault was not injected"
    assert run_in_thread(lambda: run_loop(b, objective, poll_seconds=0.2), 60) == 0
    assert_exact_budget(a.study, 1)


@pytest.mark.long
def test_an_outage_longer_than_the_grace_period_fails_no_healthy_trial(pg_server, pg_url, tiny_study, workers):
    # A worker waits up to the retry bound for the database (30 s here), its heartbeats stopped
    # meanwhile; a worker that comes back judges no heartbeat until it has seen the database up
    # for a grace period (6 s), because the others' heartbeats were stopped by the same outage.
    # The environment check refuses grace <= bound + interval, so the workers build their
    # storages with these settings themselves (the budget lock reads its bound from the
    # environment). Worker B, with one long trial, is frozen (SIGSTOP) through the outage and a
    # moment past it, as if its back-off were still sleeping; worker A, with short trials,
    # comes back first and runs its next trial while B's heartbeat is older than the grace period.
    grace, outage = 6, 10
    study = create_study(pg_url, tiny_study(), budget=4)
    settings = {
        "grace": grace,
        "retry": 30,
        "env": {"NKAT_SEARCH_DB_RETRY_SECONDS": "30", "NKAT_SEARCH_GRACE_PERIOD": "32"},
    }
    slow = workers(1, pg_url, seconds=25, steps=25, **settings)
    slow.release()
    long_trial = wait_for(lambda: [t for t in running(study) if t.intermediate_values], "worker B's trial")[0]
    fast = workers(1, pg_url, seconds=4, steps=8, **settings)
    fast.release()
    wait_for(lambda: len([t for t in running(study) if t.intermediate_values]) == 2, "worker A's trial")
    b = int(long_trial.user_attrs["worker"].rpartition(":")[2])
    os.kill(b, signal.SIGSTOP)
    try:
        pg_server.stop()
        time.sleep(outage)
        pg_server.start()
        # A ends the trial it ran through the outage and asks for the next one: B's heartbeat is
        # now older than the grace period, and B still counts as alive.
        wait_for(lambda: study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), "A's trial", timeout=60)
    finally:
        os.kill(b, signal.SIGCONT)
    assert fast.wait(timeout=120) == [0], fast.output()
    assert slow.wait(timeout=60) == [0], slow.output()
    trials = assert_exact_budget(study, 4)
    assert not [(t.number, t.user_attrs.get("fail_reason")) for t in trials if t.state == TrialState.FAIL]
    assert study.trials[long_trial.number].state == TrialState.COMPLETE
    assert "unreachable" in fast.log(0).read_text()  # A saw the outage
