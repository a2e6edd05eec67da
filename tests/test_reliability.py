"""Faults against a real PostgreSQL: a killed worker, a database restart, a database that stays down."""

import os
import signal
import time

import optuna
import pytest
from helpers import assert_exact_budget, cli, spawn, wait_for, with_stage1_epochs
from optuna.trial import TrialState

from nkat_search.storage import backends

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def _study(url):
    return optuna.load_study(study_name="tiny", storage=backends.open_storage(url))


@pytest.mark.optuna_api
def test_killed_worker_trial_is_failed_and_retried_while_others_carry_on(pg_url, tiny_study):
    path = with_stage1_epochs(tiny_study(trials=4), 3)
    assert cli("start", "--study", path, "--storage", pg_url, "--workers", "0").returncode == 0
    victim, other = spawn("worker", "--storage", pg_url), spawn("worker", "--storage", pg_url)
    study = _study(pg_url)
    wait_for(
        lambda: [
            t
            for t in study.get_trials(states=(TrialState.RUNNING,))
            if t.params and t.user_attrs.get("worker", "").endswith(f":{victim.pid}")
        ],
        what="the victim's trial",
    )
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    out = other.communicate(timeout=300)[0]
    assert other.returncode == 0, out
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1 and f":{victim.pid}" in failed[0].user_attrs["worker"]
    owner, grace = failed[0].user_attrs["worker"], os.environ["NKAT_SEARCH_GRACE_PERIOD"]  # conftest: 6
    assert failed[0].user_attrs["fail_reason"] in (
        f"worker {owner} died",
        f"no heartbeat from worker {owner} for {grace} s",
    )
    retries = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == failed[0].number]
    assert len(retries) == 1 and retries[0].params == failed[0].params
    assert_exact_budget(study, 4)


def test_database_restart_while_a_worker_runs_loses_nothing(pg_server, pg_url, tiny_study):
    path = with_stage1_epochs(tiny_study(trials=2), 6)
    assert cli("start", "--study", path, "--storage", pg_url, "--workers", "0").returncode == 0
    worker = spawn("worker", "--storage", pg_url)
    study = _study(pg_url)
    # Inside training (an epoch reported): a restart that lands while the worker asks (the trial is
    # RUNNING from ask() on) costs the lock and re-queues the trial, a FAIL this test does not allow.
    wait_for(
        lambda: [t for t in study.get_trials(states=(TrialState.RUNNING,)) if t.intermediate_values],
        what="a trial inside training",
    )
    pg_server.stop()
    time.sleep(3)
    pg_server.start()
    out = worker.communicate(timeout=300)[0]
    assert worker.returncode == 0, out
    assert "unreachable" in out and "retrying" in out  # the back-off is logged
    assert "nkat-test-pw" not in out
    study = _study(pg_url)
    assert not study.get_trials(states=(TrialState.FAIL,))
    assert_exact_budget(study, 2)


def test_database_down_past_the_bound_stops_the_worker_then_the_trial_is_retried(pg_server, pg_url, tiny_study):
    path = with_stage1_epochs(tiny_study(trials=1), 50)
    assert cli("start", "--study", path, "--storage", pg_url, "--workers", "0").returncode == 0
    worker = spawn(
        "worker", "--storage", pg_url, env={"NKAT_SEARCH_DB_RETRY_SECONDS": "2", "NKAT_SEARCH_GRACE_PERIOD": "4"}
    )
    study = _study(pg_url)
    wait_for(lambda: study.get_trials(states=(TrialState.RUNNING,)), what="a running trial")
    pg_server.stop()
    try:
        out = worker.communicate(timeout=120)[0]
    finally:
        pg_server.start()
    assert worker.returncode == 1, out
    assert "has been unreachable" in out and "Traceback" not in out
    # The next worker fails the orphaned trial, queues it again, and finishes the budget.
    with_stage1_epochs(path, 1)
    study = _study(pg_url)
    assert study.get_trials(states=(TrialState.RUNNING,))
    rerun = cli("worker", "--storage", pg_url)
    assert rerun.returncode == 0, rerun.stderr
    assert len(study.get_trials(states=(TrialState.FAIL,))) == 1
    assert_exact_budget(study, 1)
