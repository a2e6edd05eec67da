"""Workers: one budget shared exactly, signals and dead workers end trials in defined states."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from helpers import INTERRUPTED, assert_exact_budget, cli, spawn, wait_for, with_stage1_epochs
from optuna.trial import TrialState

from nkat_search.config import UsageError
from nkat_search.search import studies
from nkat_search.search.study_file import load_study
from nkat_search.search.worker import LOST_DATABASE, Worker, WorkerStopped, alive, next_trial, run_trial, run_worker
from nkat_search.storage import backends

pytestmark = [pytest.mark.optuna_api]


def _load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=backends.open_storage(url))


@pytest.mark.long
@pytest.mark.slow
def test_two_workers_share_one_budget_exactly(tiny_study, tmp_path):
    url = f"journal:{tmp_path / 's.journal'}"
    # Three epochs per trial, so that one worker cannot finish the budget before the other starts.
    path = with_stage1_epochs(tiny_study(trials=6), 3)
    created = cli("start", "--study", path, "--storage", url, "--workers", "0")
    assert created.returncode == 0, created.stderr
    workers = [spawn("worker", "--storage", url, "--study", "tiny") for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    study = _load(url, "tiny")
    assert_exact_budget(study, 6)
    assert len({t.user_attrs["worker"] for t in study.get_trials()}) == 2  # both did work


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_fails_the_running_trial_as_interrupted_and_queues_it_again(tiny_study, tmp_path, sig):
    # Enough epochs that the trial is still running when the signal arrives.
    path = with_stage1_epochs(tiny_study(trials=2), 200)
    url = f"journal:{tmp_path / 's.journal'}"
    assert cli("start", "--study", path, "--storage", url, "--workers", "0").returncode == 0
    worker = spawn("worker", "--storage", url)
    study = _load(url, "tiny")
    wait_for(
        lambda: study.get_trials(states=(TrialState.RUNNING,)) and study.get_trials()[0].intermediate_values,
        what="a running trial",
    )
    sent = time.monotonic()
    worker.send_signal(sig)
    out = worker.communicate(timeout=30)[0]
    assert time.monotonic() - sent < 10
    assert worker.returncode in INTERRUPTED, out
    first, *rest = study.get_trials()
    assert first.state == TrialState.FAIL
    assert first.user_attrs["fail_reason"] == f"interrupted ({sig.name})"
    assert len(rest) == 1 and rest[0].state == TrialState.WAITING  # the retry, same parameters
    assert rest[0].params == first.params
    assert rest[0].user_attrs == {"retry_of": first.number}  # linked, without the failed attempt's attributes
    assert rest[0].system_attrs["failed_trial"] == first.number  # as Optuna's retry callback links it


@pytest.mark.long
@pytest.mark.slow
def test_a_killed_worker_is_detected_and_its_trial_retried_on_the_embedded_storage(tiny_study, tmp_path):
    path = with_stage1_epochs(tiny_study(trials=3), 3)
    url = f"journal:{tmp_path / 's.journal'}"
    assert cli("start", "--study", path, "--storage", url, "--workers", "0").returncode == 0
    victim = spawn("worker", "--storage", url)
    study = _load(url, "tiny")
    # A trial with its owner recorded: killed between ask and that write, the trial would be an
    # orphan, failed as one ("no owner and no heartbeat"), another test's subject.
    wait_for(
        lambda: [t for t in study.get_trials(states=(TrialState.RUNNING,)) if "worker" in t.user_attrs],
        what="a running trial with its owner",
    )
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
    store = backends.open_storage(url)
    studies.create_or_resume(store, url, load_study(tiny_study(trials=5)), 5)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr("nkat_search.search.objective.fit", broken)
    with pytest.raises(WorkerStopped, match="3 trials in a row failed"):
        run_worker(url, "tiny", max_failures=3, poll_seconds=0.1)
    failed = optuna.load_study(study_name="tiny", storage=store).get_trials()
    assert [t.state for t in failed] == [TrialState.FAIL] * 3
    assert all(t.user_attrs["fail_reason"] == "RuntimeError: CUDA out of memory (simulated)" for t in failed)


@pytest.mark.long
def test_max_failures_reaches_every_worker_process_of_start(tiny_study, tmp_path):
    # Every trial crashes (an out-of-memory error, injected into each process, the spawned ones
    # too, through sitecustomize): with --max-failures 1 each of the two worker processes stops
    # after its first failed trial; the default of 3 would have failed six.
    (tmp_path / "sitecustomize.py").write_text(
        "import nkat_search.search.objective\n"
        "def fit(*args, **kwargs):\n"
        "    raise RuntimeError('CUDA out of memory (simulated)')\n"
        "nkat_search.search.objective.fit = fit\n"
    )
    url = f"journal:{tmp_path / 's.journal'}"
    run = cli(
        "start",
        "--study",
        tiny_study(trials=10),
        "--storage",
        url,
        "--workers",
        "2",
        "--max-failures",
        "1",
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "1 trial in a row failed" in run.stderr
    failed = optuna.load_study(study_name="tiny", storage=backends.open_storage(url)).get_trials(
        states=(TrialState.FAIL,)
    )
    assert [t.user_attrs["fail_reason"] for t in failed] == ["RuntimeError: CUDA out of memory (simulated)"] * 2


def test_worker_before_the_study_exists_gets_a_clear_message(tmp_path):
    url = f"journal:{tmp_path / 's.journal'}"
    with pytest.raises(UsageError, match="does not exist.*nkat-search start"):
        run_worker(url, "nope")
    run = cli("worker", "--storage", url, "--study", "nope")
    assert run.returncode == 2 and "Traceback" not in run.stderr


@pytest.mark.long
def test_start_resumes_the_same_definition_and_refuses_a_different_one(tiny_study, tmp_path):
    url = f"journal:{tmp_path / 's.journal'}"
    path = tiny_study(trials=2)
    assert cli("start", "--study", path, "--storage", url, "--workers", "0").returncode == 0
    again = cli("start", "--study", path, "--storage", url, "--workers", "0", "--trials", "7")
    assert again.returncode == 0, again.stderr
    assert _load(url, "tiny").user_attrs["budget"] == 7  # the budget may change on resume
    with_stage1_epochs(path, 2)
    changed = cli("start", "--study", path, "--storage", url, "--workers", "0")
    assert changed.returncode == 2
    assert "already exists" in changed.stderr and "stage1.epochs" in changed.stderr
    assert len(optuna.get_all_study_names(backends.open_storage(url))) == 1


def _run_trivial(url: str, name: str) -> optuna.Study:
    """Run a study's budget with a torch-free objective (the storage path of a worker only)."""
    from nkat_search.search import space, worker

    store = backends.open_storage(url, create=False)
    study, config = studies.attach(store, url, name)
    assert (
        worker.run_loop(
            worker.Worker(study, store, url, config),
            lambda trial: space.suggest(trial, config)["embed_dim"] / 16,
            poll_seconds=0.1,
        )
        == 0
    )
    return study


def test_enqueued_configurations_run_first_and_once(tiny_study, tmp_path):
    url = f"journal:{tmp_path / 's.journal'}"
    config = load_study(tiny_study(trials=3, extra="\n[[enqueue]]\nembed_dim = 16\ntemperature = 0.65\n"))
    studies.create_or_resume(backends.open_storage(url), url, config, 3)
    studies.create_or_resume(backends.open_storage(url), url, config, 3)  # a resume enqueues nothing new
    study = _run_trivial(url, "tiny")
    trials = study.get_trials()
    assert len(trials) == 3 and trials[0].params == {"embed_dim": 16, "temperature": 0.65}
    assert [t.user_attrs.get("enqueued", False) for t in trials] == [True, False, False]


def test_warm_start_adds_history_outside_the_budget_and_refuses_a_misfit(tiny_study, tmp_path):
    url = f"journal:{tmp_path / 's.journal'}"
    store = backends.open_storage(url)
    studies.create_or_resume(store, url, load_study(tiny_study(name="first", trials=3)), 3)
    _run_trivial(url, "first")
    second = load_study(tiny_study(name="second", trials=2))
    studies.create_or_resume(backends.open_storage(url), url, second, 2, warm_start_from="first")
    studies.create_or_resume(backends.open_storage(url), url, second, 2, warm_start_from="first")  # no second copy
    study = _run_trivial(url, "second")
    warm = [t for t in study.get_trials() if studies.is_warm_start(t)]
    assert len(warm) == 3 and all(t.state == TrialState.COMPLETE for t in warm)
    assert len([t for t in study.get_trials() if not studies.is_warm_start(t)]) == 2  # the budget, run here
    narrow = dataclasses_replace_space(
        load_study(tiny_study(name="third", trials=2)), "temperature", low=0.99, high=1.0
    )
    with pytest.raises(UsageError, match="outside this study's ranges"):
        studies.create_or_resume(backends.open_storage(url), url, narrow, 2, warm_start_from="first")
    with pytest.raises(UsageError, match="no such study"):
        studies.create_or_resume(backends.open_storage(url), url, second, 2, warm_start_from="nope")


def dataclasses_replace_space(config, name: str, **changes):
    import dataclasses

    space = tuple(dataclasses.replace(p, **changes) if p.name == name else p for p in config.space)
    return dataclasses.replace(config, space=space)


def test_process_liveness_judges_only_processes_that_are_gone_as_dead(monkeypatch):
    # psutil, not os.kill(pid, 0), which would end the probed process on Windows
    import psutil

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: that pid is gone
    assert alive(os.getpid()) and not alive(child.pid)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_for(lambda: psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE, what="an unreaped child")
    assert not alive(zombie.pid)  # exited, not yet reaped by its parent: dead, its trial can be failed
    zombie.wait()

    def denied(pid):
        raise psutil.AccessDenied(pid)

    monkeypatch.setattr(psutil, "Process", denied)
    assert alive(12345)  # another user's process that we may not inspect is still running


def a_queued_configuration(tiny_study, tmp_path, trials: int):
    """A tiny study on a journal with one configuration queued: (config, url, storage, study, it)."""
    config = load_study(tiny_study(trials=trials))
    url = f"journal:{tmp_path / 's.journal'}"
    store = backends.open_storage(url)
    study = studies.create_or_resume(store, url, config, trials)
    wanted = {"embed_dim": 16, "temperature": 0.75}
    study.enqueue_trial(wanted)
    return config, url, store, study, wanted


def test_a_queued_configuration_given_up_before_it_ran_is_queued_again(tiny_study, tmp_path, monkeypatch):
    # The budget lock's connection is lost while a worker asks, and what it received is a queued
    # configuration (an [[enqueue]] entry or the retry of a dead worker's trial). It must not run
    # that trial, and the configuration must be queued again, not lost (issue 23's chaos failure).
    import contextlib

    from nkat_search.search import space, worker
    from nkat_search.storage import lock

    config, url, store, study, wanted = a_queued_configuration(tiny_study, tmp_path, trials=2)
    real_lock, lost = lock.budget_lock, []

    @contextlib.contextmanager
    def losing_lock(*args, **kwargs):
        with real_lock(*args, **kwargs) as held:
            yield (lambda: False) if not lost and not lost.append(1) else held

    monkeypatch.setattr(lock, "budget_lock", losing_lock)
    w = worker.Worker(study, store, url, config)
    assert worker.next_trial(w) is worker.WAIT
    given_up = study.get_trials()[0]
    assert given_up.state == TrialState.FAIL and given_up.user_attrs["fail_reason"].startswith("not run")
    assert worker.run_loop(w, lambda t: sum(space.suggest(t, config).values()), poll_seconds=0.1) == 0
    trials = study.get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2 and wanted in [t.params for t in done]
    assert [t.user_attrs.get("retry_of") for t in done if t.params == wanted] == [given_up.number]


def test_a_queued_configuration_killed_after_its_first_parameter_is_queued_again_whole(tiny_study, tmp_path):
    # A worker took a queued configuration and died after its first parameter was written: the
    # trial held embed_dim alone, the retry queued that much, and the sampler drew a new
    # temperature; the configuration was lost (found by the campaign: `benchmarks.faults --seed
    # 1198 --storage postgresql`). The retry now queues the whole of the queue's fixed parameters.
    from nkat_search.search import space, worker
    from nkat_search.storage import retrying

    config, url, store, study, wanted = a_queued_configuration(tiny_study, tmp_path, trials=1)
    partial = study.ask()
    partial.suggest_int("embed_dim", 8, 16, step=8)  # then the worker died
    retrying.retry(study, study.get_trials()[0])
    w = worker.Worker(study, store, url, config)
    worker.fail_trial(w, partial.number, "worker died", retry=False)
    assert worker.run_loop(w, lambda t: sum(space.suggest(t, config).values()), poll_seconds=0.1) == 0
    (done,) = study.get_trials(states=(TrialState.COMPLETE,))
    assert done.params == wanted and done.user_attrs["retry_of"] == partial.number


def test_a_dropped_connection_inside_the_objective_fails_the_trial_and_queues_it_again(tiny_study, tmp_path):
    # A storage call of the objective (a suggest, a report) meets a connection the server dropped:
    # the database's fault, not the configuration's. Found by `benchmarks.faults --seed 13 --storage
    # postgresql` (a restart); the trial was FAILED with the driver's error and never run again.
    import sqlalchemy.exc

    url = f"journal:{tmp_path / 's.journal'}"
    config = load_study(tiny_study())
    store = backends.open_storage(url)
    study = studies.create_or_resume(store, url, config, 1)
    w = Worker(study, store, url, config)
    trial = next_trial(w)
    trial.suggest_int("embed_dim", 8, 16, step=8)

    def objective(t):
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))

    assert run_trial(w, trial, objective) == TrialState.FAIL
    trials = study.get_trials()
    assert trials[0].user_attrs["fail_reason"].startswith(LOST_DATABASE)
    assert [(t.state, t.user_attrs.get("retry_of")) for t in trials[1:]] == [(TrialState.WAITING, 0)]
