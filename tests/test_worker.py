"""Workers: one budget shared exactly, signals and dead workers end trials in defined states."""

import signal
import time

import optuna
import pytest
from optuna.trial import TrialState

from conftest import cli, spawn
from nkat_search import storage as st
from nkat_search.config import UsageError
from nkat_search.study import load_study
from nkat_search.worker import WorkerStopped, run_worker

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=st.open_storage(url))


def _wait_for(predicate, timeout: float = 120, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _with_stage1_epochs(path: str, epochs: int) -> str:
    with open(path) as fh:
        text = fh.read().replace("epochs = 1\ngate", f"epochs = {epochs}\ngate")
    with open(path, "w") as fh:
        fh.write(text)
    return path


def assert_exact_budget(study: optuna.Study, budget: int) -> None:
    trials = study.get_trials()
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == budget
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))


@pytest.mark.slow
def test_two_workers_share_one_budget_exactly(tiny_study, tmp_path):
    url = f"journal:{tmp_path / 's.journal'}"
    # Three epochs per trial, so that one worker cannot finish the budget before the other starts.
    path = _with_stage1_epochs(tiny_study(trials=6), 3)
    created = cli("start", "--study", path, "--storage", url, "--workers", "0")
    assert created.returncode == 0, created.stderr
    workers = [spawn("worker", "--storage", url, "--study", "tiny") for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    study = _load(url, "tiny")
    assert_exact_budget(study, 6)
    assert len({t.user_attrs["worker"] for t in study.get_trials()}) == 2  # both did work


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_fails_the_running_trial_as_interrupted_and_queues_it_again(tiny_study, tmp_path, sig):
    # Enough epochs that the trial is still running when the signal arrives.
    path = _with_stage1_epochs(tiny_study(trials=2), 200)
    url = f"journal:{tmp_path / 's.journal'}"
    assert cli("start", "--study", path, "--storage", url, "--workers", "0").returncode == 0
    worker = spawn("worker", "--storage", url)
    study = _load(url, "tiny")
    _wait_for(lambda: study.get_trials(states=(TrialState.RUNNING,))
              and study.get_trials()[0].intermediate_values, what="a running trial")
    sent = time.monotonic()
    worker.send_signal(sig)
    out = worker.communicate(timeout=30)[0]
    assert time.monotonic() - sent < 10
    assert worker.returncode == 130, out
    first, *rest = study.get_trials()
    assert first.state == TrialState.FAIL
    assert first.user_attrs["fail_reason"] == f"interrupted ({sig.name})"
    assert len(rest) == 1 and rest[0].state == TrialState.WAITING  # the retry, same parameters
    assert rest[0].params == first.params
    assert rest[0].user_attrs == {"retry_of": first.number}  # linked, without the failed attempt's attributes
    assert rest[0].system_attrs["failed_trial"] == first.number  # as Optuna's retry callback links it


@pytest.mark.slow
def test_a_killed_worker_is_detected_and_its_trial_retried_on_the_embedded_storage(tiny_study, tmp_path):
    path = _with_stage1_epochs(tiny_study(trials=3), 3)
    url = f"journal:{tmp_path / 's.journal'}"
    assert cli("start", "--study", path, "--storage", url, "--workers", "0").returncode == 0
    victim = spawn("worker", "--storage", url)
    study = _load(url, "tiny")
    _wait_for(lambda: study.get_trials(states=(TrialState.RUNNING,)), what="a running trial")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert study.get_trials(states=(TrialState.RUNNING,))  # left RUNNING by the dead process
    survivor = cli("worker", "--storage", url)
    assert survivor.returncode == 0, survivor.stderr
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1 and failed[0].user_attrs["fail_reason"] == f"worker {failed[0].user_attrs['worker']} died"
    assert_exact_budget(study, 3)


def test_consecutive_failures_stop_the_worker_with_a_clear_message(tiny_study, tmp_path, monkeypatch):
    url = f"journal:{tmp_path / 's.journal'}"
    store = st.open_storage(url)
    st.create_or_resume(store, url, load_study(tiny_study(trials=5)), 5)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr("nkat_search.objective.fit", broken)
    with pytest.raises(WorkerStopped, match="3 trials in a row failed"):
        run_worker(url, "tiny", max_failures=3, poll_seconds=0.1)
    failed = optuna.load_study(study_name="tiny", storage=store).get_trials()
    assert [t.state for t in failed] == [TrialState.FAIL] * 3
    assert all(t.user_attrs["fail_reason"] == "RuntimeError: CUDA out of memory (simulated)" for t in failed)


def test_worker_before_the_study_exists_gets_a_clear_message(tmp_path):
    url = f"journal:{tmp_path / 's.journal'}"
    with pytest.raises(UsageError, match="does not exist.*nkat-search start"):
        run_worker(url, "nope")
    run = cli("worker", "--storage", url, "--study", "nope")
    assert run.returncode == 2 and "Traceback" not in run.stderr


def test_start_resumes_the_same_definition_and_refuses_a_different_one(tiny_study, tmp_path):
    url = f"journal:{tmp_path / 's.journal'}"
    path = tiny_study(trials=2)
    assert cli("start", "--study", path, "--storage", url, "--workers", "0").returncode == 0
    again = cli("start", "--study", path, "--storage", url, "--workers", "0", "--trials", "7")
    assert again.returncode == 0, again.stderr
    assert _load(url, "tiny").user_attrs["budget"] == 7  # the budget may change on resume
    _with_stage1_epochs(path, 2)
    changed = cli("start", "--study", path, "--storage", url, "--workers", "0")
    assert changed.returncode == 2
    assert "already exists" in changed.stderr and "stage1.epochs" in changed.stderr
    assert len(optuna.get_all_study_names(st.open_storage(url))) == 1
