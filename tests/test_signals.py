"""Ctrl-C pressed many times in quick succession while a trial runs.

A terminal sends SIGINT to every process of the foreground process group, and an impatient user
presses Ctrl-C again and again; a scheduler follows up with SIGTERM. Whatever the burst, the
worker must end the way one signal ends it: exit 130 without a traceback, the running trial
FAILED as "interrupted (...)" and queued again (a WAITING retry with the same parameters, linked
by retry_of), nothing left RUNNING. The worker is a real `nkat-search start` process on the
embedded journal storage.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import optuna
import pytest
from helpers import INTERRUPTED, TINY_STUDY, child_signals, wait_for
from optuna.trial import TrialState

from nkat_search.storage import backends

# The burst: 10 Ctrl-C 5 ms apart, 3 SIGTERM (docker stop, Slurm), then Ctrl-C every 20 ms until the
# worker has exited, as a user does who keeps pressing it: the last ones land while Python shuts down.
SIGINTS, SIGTERMS, GAP, REPEAT = 10, 3, 0.005, 0.02


def _study_exists(path, url: str) -> bool:
    return path.exists() and "tiny" in optuna.get_all_study_names(backends.open_storage(url, create=False))


def _running_in_training(study: optuna.Study, count: int):
    """The RUNNING trials, once `count` of them have reported an epoch (so they are inside fit())."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return running if len(running) >= count and all(t.intermediate_values for t in running) else None


def _burst(proc: subprocess.Popen, pgid: int) -> None:
    """What a terminal does on Ctrl-C (the signal goes to the whole process group), again and again."""
    deadline = time.monotonic() + 60
    for i in itertools.count():
        if i >= SIGINTS + SIGTERMS and (proc.poll() is not None or time.monotonic() > deadline):
            return
        try:
            os.killpg(pgid, signal.SIGINT if i < SIGINTS or i >= SIGINTS + SIGTERMS else signal.SIGTERM)
        except ProcessLookupError:  # every process of the group has exited
            return
        time.sleep(GAP if i < SIGINTS + SIGTERMS else REPEAT)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for_group(pgid: int, timeout: float = 60) -> bool:
    """True once no process of the group is left; False when some still run after timeout seconds."""
    deadline = time.monotonic() + timeout
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@dataclass
class Burst:
    """What one burst did: the trials that were running, the trials afterwards, the command's end."""

    running: list
    trials: list
    returncode: int
    output: str
    seconds: float
    outlived: bool


def run_burst(folder, workers: int) -> Burst:
    """`nkat-search start` with `workers` worker processes; once every one of them trains, the burst."""
    # Many short Stage-1 epochs: the trial is still running when the burst arrives, and it reports
    # an epoch every few seconds, so the burst can land inside training or inside a storage write.
    path = folder / "tiny.toml"
    path.write_text(
        TINY_STUDY.format(name="tiny", trials=2, gate=0.01).replace("epochs = 1\ngate", "epochs = 500\ngate")
    )
    url = f"journal:{folder / 's.journal'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nkat_search.cli",
            "start",
            "--study",
            str(path),
            "--trials",
            "2",
            "--storage",
            url,
            "--workers",
            str(workers),
            "--gpus",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=folder,
        start_new_session=True,
        preexec_fn=child_signals,
    )  # its own process group, as a shell job has
    try:
        wait_for(lambda: _study_exists(folder / "s.journal", url), "the study to be created", 240, proc)
        study = optuna.load_study(study_name="tiny", storage=backends.open_storage(url, create=False))
        running = wait_for(
            lambda: _running_in_training(study, workers), f"{workers} trial(s) running inside training", 300, proc
        )
        sent = time.monotonic()
        pgid = os.getpgid(proc.pid)
        _burst(proc, pgid)
        out = proc.communicate(timeout=120)[0]
        seconds = time.monotonic() - sent
        # Worker processes may not outlive the command (multiprocessing's resource tracker takes a moment
        # to notice that its parent is gone, so give the group a few seconds).
        outlived = not _wait_for_group(pgid, timeout=10)
        _wait_for_group(pgid)
    finally:  # whatever happened, no process of the group is left behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return Burst(running, study.get_trials(), proc.returncode, out, seconds, outlived)


@pytest.fixture(scope="module")
def burst(tmp_path_factory):
    """burst(workers): the Burst of that many worker processes, run once per module."""
    done: dict[int, Burst] = {}

    def get(workers: int) -> Burst:
        if workers not in done:
            done[workers] = run_burst(tmp_path_factory.mktemp(f"burst-{workers}"), workers)
        return done[workers]

    return get


WORKERS = [pytest.param(1, id="one-worker"), pytest.param(2, id="two-worker-processes")]


@pytest.mark.slow
@pytest.mark.parametrize("workers", WORKERS)
def test_a_burst_of_ctrl_c_fails_the_running_trials_once_and_queues_them_again(burst, workers):
    b = burst(workers)
    assert b.seconds < 60, f"the worker took {b.seconds:.0f} s to stop"
    assert not [t.number for t in b.trials if t.state == TrialState.RUNNING], b.output
    for was in b.running:
        trial = b.trials[was.number]
        assert trial.state == TrialState.FAIL, (trial.number, trial.state, b.output)
        assert trial.user_attrs.get("fail_reason", "").startswith("interrupted"), (trial.user_attrs, b.output)
        retries = [t for t in b.trials if t.user_attrs.get("retry_of") == trial.number]
        assert len(retries) == 1, ([(t.number, t.state, t.user_attrs) for t in b.trials], b.output)
        assert retries[0].state == TrialState.WAITING and retries[0].params == trial.params
    # Nothing but the interrupted trials and their retries: the burst started no other trial.
    assert len(b.trials) == 2 * len(b.running), [(t.number, t.state, t.user_attrs) for t in b.trials]


@pytest.mark.slow
@pytest.mark.parametrize("workers", WORKERS)
def test_a_burst_of_ctrl_c_ends_the_command_with_exit_130_and_one_line(burst, workers):
    b = burst(workers)
    assert "Traceback" not in b.output and "Exception ignored" not in b.output, b.output
    assert b.returncode in INTERRUPTED, b.output
    assert b.output.rstrip().splitlines()[-1] == "nkat-search: interrupted", b.output  # the last word, once
    assert not b.outlived, f"worker processes outlived `nkat-search start`:\n{b.output}"
