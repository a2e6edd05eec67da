"""Running trials: the budget loop of one worker, local worker processes over devices, signals.

Every trial ends in a defined state with its reason on the trial: COMPLETE; PRUNED (pruner, gate,
non-finite loss); FAILED with `fail_reason` (an exception, "interrupted", a dead worker). Trials
that failed through no fault of their own (interrupted, worker died) are queued again with the
same parameters by storage.retry, linked to the original.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Iterator

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from . import storage as st
from .config import UsageError
from .dashboard import annotate_trial
from .data import load_splits
from .objective import make_objective

log = logging.getLogger("nkat_search")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WAIT, DONE = "wait", "done"


class WorkerStopped(RuntimeError):
    """The worker gave up (too many consecutive failures): exit 1 with this message."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived while a trial ran."""


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@contextlib.contextmanager
def heartbeat(storage, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat every interval while it runs (RDB storages; no-op otherwise)."""
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception as exc:  # a database blip must not kill the thread; the next beat retries
                log.warning("heartbeat of trial %d failed: %s", trial_id, st.mask(str(exc).splitlines()[0]))
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True, name="heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str, retry: bool) -> None:
    """Mark a RUNNING trial FAILED with its reason; queue a retry with the same parameters if asked.

    A trial that another worker already ended (its heartbeat went stale while the database was
    away) is left as it is: that worker queued its retry.
    """
    if study._storage.get_trial(trial._trial_id).state.is_finished():
        log.warning("trial %d was already ended by another worker; leaving it", trial.number)
        return
    study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
    study.tell(trial.number, state=TrialState.FAIL)
    if retry:
        st.retry(study, study._storage.get_trial(trial._trial_id))


def fail_dead_trials(study: optuna.Study, storage) -> None:
    """Fail RUNNING trials whose worker is gone, with the reason, and queue them again: trials whose
    heartbeat is stale (RDB storages) and, on any storage, trials of a process on this host that no
    longer exists (the journal storage has no heartbeat)."""
    host = socket.gethostname()
    stale = set(storage._get_stale_trial_ids(study._study_id)) if isinstance(storage, RDBStorage) else set()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("worker", "")
        name, _, pid = owner.rpartition(":")
        if trial._trial_id in stale:
            reason = f"no heartbeat from worker {owner or '(unknown)'} for {storage.grace_period} s"
        elif name == host and pid.isdigit() and not _alive(int(pid)):
            reason = f"worker {owner} died"
        else:
            continue
        log.warning("trial %d: %s; failing it and queueing a retry", trial.number, reason)
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            fail_trial(study, trial, reason, retry=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def next_trial(study: optuna.Study, storage, url: str):
    """A new trial, WAIT (others' running trials may still fail) or DONE (the budget is finished)."""
    with st.budget_lock(url, study.study_name):
        fail_dead_trials(study, storage)
        budget = study.user_attrs["budget"]
        trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
        done = sum(t.state in FINISHED for t in trials)
        if done >= budget:
            return DONE
        if len(trials) >= budget:
            return WAIT
        # Optuna warns (UserWarning) that heartbeats are meant for Study.optimize; this loop runs them itself.
        with warnings.catch_warnings(action="ignore", category=UserWarning):
            trial = study.ask()
        trial.set_user_attr("worker", worker_id())
        log.info("trial %d: %d of %d finished, %d running", trial.number, done, budget, len(trials) - done + 1)
        return trial


def run_trial(study: optuna.Study, trial: optuna.Trial, objective) -> TrialState:
    """Run one trial to a defined end state (an interrupt fails it, queues a retry and re-raises)."""
    started = time.perf_counter()
    try:
        with heartbeat(study._storage, trial._trial_id):
            try:
                value = objective(trial)
            except optuna.TrialPruned as exc:
                study.tell(trial, state=TrialState.PRUNED)
                log.info("trial %d pruned after %.1f s: %s", trial.number, time.perf_counter() - started, exc)
                return TrialState.PRUNED
            except (KeyboardInterrupt, st.StorageUnavailable):
                raise
            except Exception as exc:  # a crash, an OOM, a bug: FAILED with the error on the trial
                reason = f"{type(exc).__name__}: {exc}"
                fail_trial(study, study._storage.get_trial(trial._trial_id), reason, retry=False)
                log.error("trial %d failed: %s", trial.number, reason)
                return TrialState.FAIL
        study.tell(trial, value)
        log.info("trial %d complete in %.1f s: global TPE %.4f (best so far %.4f)",
                 trial.number, time.perf_counter() - started, value, study.best_value)
        return TrialState.COMPLETE
    finally:
        with contextlib.suppress(st.StorageUnavailable):
            frozen = study._storage.get_trial(trial._trial_id)
            if frozen.state.is_finished():
                annotate_trial(study, frozen)


def interrupt(study: optuna.Study, trial: optuna.Trial, exc: KeyboardInterrupt) -> None:
    """A signal arrived: fail the trial if it still runs, with the reason, and queue it again."""
    frozen = study._storage.get_trial(trial._trial_id)
    if frozen.state == TrialState.RUNNING:
        reason = f"interrupted ({exc})" if str(exc) else "interrupted"
        fail_trial(study, frozen, reason, retry=True)
        log.warning("trial %d %s; it is queued again", trial.number, reason)


def run_worker(url: str, study_name: str | None, device: str = "cpu", *, max_failures: int = 3,
               poll_seconds: float = 2.0, data_root: str | None = None) -> int:
    """Attach to a study and run trials until its budget of finished trials is reached.

    data_root, when given, replaces the study's data root: where the datasets lie is a property
    of the host, not of the search."""
    storage = st.open_storage(url, create=False)
    study, config = st.attach(storage, url, study_name)
    if data_root:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, root=data_root))
    cache: dict = {}

    def load(dataset: str):
        if dataset not in cache:
            cache[dataset] = load_splits(dataset, config.data, device)
        return cache[dataset]

    objective = make_objective(config, load)
    log.info("worker %s on %s: study %r in %s", worker_id(), device, study.study_name, st.mask(url))
    failures = 0
    while True:
        trial = None
        try:
            trial = next_trial(study, storage, url)
            if trial is DONE:
                log.info("study %r reached its budget of %d finished trials", study.study_name,
                         study.user_attrs["budget"])
                return 0
            if trial is WAIT:
                time.sleep(poll_seconds)
                continue
            state = run_trial(study, trial, objective)
        except KeyboardInterrupt as exc:
            if isinstance(trial, optuna.Trial):
                interrupt(study, trial, exc)
            raise
        failures = failures + 1 if state == TrialState.FAIL else 0
        if failures >= max_failures:
            raise WorkerStopped(f"{failures} trials in a row failed on this worker (see fail_reason on the trials); "
                                "stopping instead of burning the budget: fix the cause and start the worker again.")


def parse_devices(gpus: str | None) -> list[str]:
    """--gpus: '0,2' -> cuda:0, cuda:2; 'cpu' -> cpu; default: every visible GPU, or the CPU."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus is None:
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
    if gpus.strip() == "cpu":
        return ["cpu"]
    devices = []
    for part in gpus.split(","):
        if not part.strip().isdigit():
            raise UsageError(f"--gpus {gpus!r} is not a list of GPU indices; use e.g. --gpus 0,1 or --gpus cpu.")
        if int(part) >= count:
            raise UsageError(f"GPU {int(part)} does not exist: this machine has {count} visible GPU(s); "
                             "use an index below that or --gpus cpu.")
        devices.append(f"cuda:{int(part)}")
    return devices


def _child(url: str, study_name: str, device: str, verbose: bool, threads: int, data_root: str | None) -> None:
    import torch

    torch.set_num_threads(threads)  # K CPU workers share the cores instead of oversubscribing them
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format=f"%(asctime)s %(levelname)s [{device} pid {os.getpid()}] %(message)s", datefmt="%H:%M:%S")
    install_signal_handlers()
    try:
        code = run_worker(url, study_name, device, data_root=data_root)
    except KeyboardInterrupt:
        code = 130
    except (UsageError, WorkerStopped, st.StorageUnavailable) as exc:
        log.error("%s", exc)
        code = 2 if isinstance(exc, UsageError) else 1
    raise SystemExit(code)


def run_processes(url: str, study_name: str, devices: list[str], count: int, verbose: bool = False,
                  data_root: str | None = None) -> int:
    """count worker processes, device i % len(devices) each; the worst exit code of them."""
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // count)
    procs = [ctx.Process(target=_child, args=(url, study_name, devices[i % len(devices)], verbose, threads, data_root))
             for i in range(count)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            p.join()
        raise
    return max((p.exitcode or 0) if (p.exitcode or 0) >= 0 else 1 for p in procs)


def install_signal_handlers() -> None:
    """SIGTERM (docker stop) and SIGINT (Ctrl-C) raise Interrupted in the main thread."""

    def handler(signum, _frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
