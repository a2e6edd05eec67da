"""Running trials: the budget loop of one worker, local worker processes over devices, signals.

Every trial ends in a defined state with its reason on the trial: COMPLETE; PRUNED (pruner, gate,
non-finite loss); FAILED with `fail_reason` (an exception, "interrupted", a dead worker, a lost
reply). Trials that failed through no fault of their own (interrupted, worker died, orphaned) are
queued again with the same parameters by storage.retry, linked to the original.

The loop follows Optuna's own study/_optimize.py::_run_trial (fail stale trials, ask, heartbeat,
run, PRUNED on TrialPruned, FAIL with the reason on an exception, tell) with ask-and-tell, because
Study.optimize cannot keep a budget shared by workers on several hosts exactly: the count and the
ask happen under storage.budget_lock. This module imports no torch; run_worker loads the
training stack when it starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable

import optuna
from optuna.trial import TrialState

from ..config import RuntimeFailure, UsageError
from ..storage import backends, lock, retrying, urls
from . import studies
from .kinds import sampler
from .liveness import alive, grace_seconds, heartbeat
from .signals import deferred_signals
from .study_file import StudyConfig

log = logging.getLogger("nkat_search")


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

# The reason of a trial whose objective lost the database connection (queued again).
LOST_DATABASE = "the database connection was lost during the trial"


WAIT, DONE = "wait", "done"


Objective = Callable[[optuna.Trial], float]


class WorkerStopped(RuntimeFailure):
    """The worker gave up (too many consecutive failures): exit 1 with this message."""


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclasses.dataclass
class Worker:
    """One worker's view of a study: the handle, the storage it was opened on, and its URL."""

    study: optuna.Study
    storage: optuna.storages.BaseStorage
    url: str
    config: StudyConfig
    study_id: int = -1

    def __post_init__(self) -> None:
        self.study_id = self.storage.get_study_id_from_name(self.study.study_name)

    def trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def frozen(self, number: int) -> optuna.trial.FrozenTrial:
        return self.storage.get_trial(self.trial_id(number))


def fail_trial(w: Worker, number: int, reason: str, retry: bool) -> None:
    """Mark a RUNNING trial FAILED with its reason; queue a retry with the same parameters if asked.

    The retry is queued first: a worker that dies between the two leaves the trial RUNNING, and
    the worker that fails it later finds its retry queued already; the other way round it would
    leave a FAIL whose configuration nobody queues again. A trial that another worker already
    ended is left as it is: that worker queued its retry."""
    tid = w.trial_id(number)
    trial = w.storage.get_trial(tid)
    if trial.state.is_finished():
        log.warning("trial %d was already ended by another worker; leaving it", number)
        return
    if retry:
        retrying.retry(w.study, trial)
    try:
        w.storage.set_trial_user_attr(tid, "fail_reason", reason)
        w.study.tell(number, state=TrialState.FAIL)
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError):
        if w.storage.get_trial(tid).state.is_finished():
            log.warning("trial %d was ended by another worker meanwhile; leaving it", number)
            return
        raise


def fail_dead_trials(w: Worker) -> None:
    """Fail RUNNING trials whose worker is gone, with the reason, and queue them again: trials whose
    heartbeat is stale (RDB storages), trials of a process on this host that no longer exists, and
    orphans (no owner past the grace period plus one heartbeat interval: a worker lost the reply of
    the call that created or claimed them, or died before it recorded the trial's heartbeat). The
    extra interval lets a trial whose worker died after its first heartbeat, before its owner, be
    judged by that heartbeat, which is written a moment after the trial's start time. Called under
    the budget lock, where owners are recorded.

    A worker that has just come back from a database outage judges no heartbeat until it has seen
    the database up for a grace period itself: the other workers' heartbeats were stopped by the
    same outage."""
    host, grace = socket.gethostname(), grace_seconds(w.storage)
    interval = w.storage.get_heartbeat_interval() if hasattr(w.storage, "get_heartbeat_interval") else None
    orphan_after = grace + (interval or 0)
    quarantined = time.monotonic() - getattr(w.storage, "recovered_at", float("-inf")) < grace
    stale = set() if quarantined else retrying.stale_trial_ids(w.storage, w.study_id)
    if stale is None:  # an Optuna without the query: its public sweep fails and retries them, reason unsaid
        _warn_once(
            "this Optuna cannot list stale trials; optuna.storages.fail_stale_trials fails and retries "
            "them, without a fail_reason"
        )
        # "experimental" since Optuna 2.9, like the heartbeats themselves (see storage.open_storage)
        with warnings.catch_warnings(action="ignore", category=optuna.exceptions.ExperimentalWarning):
            optuna.storages.fail_stale_trials(w.study)
        stale = set()
    now = datetime.datetime.now()
    for trial in w.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("worker", "")
        name, _, pid = owner.rpartition(":")
        if w.trial_id(trial.number) in stale:
            reason = f"no heartbeat from worker {owner or '(unknown)'} for {grace:.0f} s"
        elif name == host and pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)):
            reason = f"worker {owner} died"
        elif (
            not owner
            and not quarantined
            and trial.datetime_start
            and (now - trial.datetime_start).total_seconds() > orphan_after
        ):
            reason = (
                f"no owner and no heartbeat for {grace:.0f} s (its worker died or lost the reply while claiming it)"
            )
        else:
            continue
        log.warning("trial %d: %s; failing it and queueing a retry", trial.number, reason)
        fail_trial(w, trial.number, reason, retry=True)


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def budget_counts(w: Worker) -> tuple[int, int, int]:
    """(budget, finished, started) of the study; warm-start copies are history, not budget."""
    trials = [
        t
        for t in w.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
        if not studies.is_warm_start(t)
    ]
    return w.study.user_attrs["budget"], sum(t.state in FINISHED for t in trials), len(trials)


def next_trial(w: Worker):
    """A new trial, WAIT (others' running trials may still fail) or DONE (the budget is finished
    and no trial runs: an orphan of the last trial, created twice by Optuna after a lost reply, is
    waited for until fail_dead_trials fails it, so that none is left RUNNING).

    Under the budget lock: dead trials are failed first, the trial is asked with a sampler seeded
    for its position in the study, and its first heartbeat and then its owner are recorded before
    the lock is released. In that order a worker that dies at any point leaves a trial that
    fail_dead_trials recognises: asked only (no heartbeat, no owner: an orphan), or with a
    heartbeat that goes stale. An owner without a heartbeat would be neither, and on another host
    nobody could tell that its worker is gone."""
    with lock.budget_lock(w.url, w.study.study_name) as held:
        fail_dead_trials(w)
        budget, done, started = budget_counts(w)
        if done >= budget and started == done:
            return DONE
        if started >= budget:
            return WAIT
        w.study.sampler = sampler(w.config, trial_index=len(w.study.get_trials(deepcopy=False)))
        # Optuna warns (UserWarning) that heartbeats are meant for Study.optimize; this loop runs them itself.
        with warnings.catch_warnings(action="ignore", category=UserWarning):
            trial = w.study.ask()
        # Optuna's heartbeat storages (BaseHeartbeat, not exported) have both methods or neither.
        if (
            hasattr(w.storage, "record_heartbeat")
            and hasattr(w.storage, "get_heartbeat_interval")
            and w.storage.get_heartbeat_interval()
        ):
            w.storage.record_heartbeat(w.trial_id(trial.number))
        trial.set_user_attr("worker", worker_id())
        if not held():  # the server dropped the lock's connection: another worker may have asked too
            # Queued again: a configuration from the queue ([[enqueue]] or a retry) is never lost.
            fail_trial(w, trial.number, "not run: the budget lock was lost while asking", retry=True)
            log.warning("trial %d: the budget lock was lost while asking; not running it (queued again)", trial.number)
            return WAIT
        log.debug("trial %d: %d of %d finished, %d running", trial.number, done, budget, started - done + 1)
        return trial


def run_trial(
    w: Worker,
    trial: optuna.Trial,
    objective: Objective,
    on_end: Callable[[optuna.trial.FrozenTrial], None] | None = None,
) -> TrialState:
    """Run one trial to a defined end state (an interrupt or a lost database propagates; see interrupt)."""
    started = time.perf_counter()
    try:
        with heartbeat(w.storage, w.trial_id(trial.number)):
            try:
                value = objective(trial)
            except optuna.TrialPruned as exc:
                w.study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
                log.debug("trial %d pruned after %.1f s: %s", trial.number, time.perf_counter() - started, exc)
                return TrialState.PRUNED
            except (KeyboardInterrupt, retrying.StorageUnavailable):
                raise
            except Exception as exc:  # a crash, an OOM, a bug: FAILED with the error on the trial
                reason = f"{type(exc).__name__}: {urls.mask_text(str(exc), w.url)}"[:2000]
                lost = retrying.connection_error(exc) is not None
                if lost:  # a storage call of the objective met a dropped connection: not the configuration's fault
                    reason = f"{LOST_DATABASE} ({reason})"[:2000]
                fail_trial(w, trial.number, reason, retry=lost)
                log.debug("trial %d failed: %s", trial.number, reason)
                return TrialState.FAIL
        w.study.tell(trial, value, skip_if_finished=True)
        log.debug("trial %d complete in %.1f s: global TPE %.4f", trial.number, time.perf_counter() - started, value)
        return TrialState.COMPLETE
    finally:
        if on_end is not None:
            with contextlib.suppress(retrying.StorageUnavailable):
                frozen = w.frozen(trial.number)
                if frozen.state.is_finished():
                    on_end(frozen)


def interrupt(w: Worker, trial: optuna.Trial, exc: KeyboardInterrupt) -> None:
    """A signal arrived: fail the trial if it still runs, with the reason, and queue it again."""
    if w.frozen(trial.number).state == TrialState.RUNNING:
        reason = f"interrupted ({exc})" if str(exc) else "interrupted"
        fail_trial(w, trial.number, reason, retry=True)
        log.warning("trial %d %s; it is queued again", trial.number, reason)


def run_loop(
    w: Worker,
    objective: Objective,
    *,
    max_failures: int = 3,
    poll_seconds: float = 2.0,
    on_end: Callable[[optuna.trial.FrozenTrial], None] | None = None,
    before_trial: Callable[[], object] | None = None,
) -> int:
    """Run trials until the study holds its budget of finished trials; 0 when it does.

    Needs nothing but the storage and an objective (the storage tests run it without torch)."""
    if max_failures < 1:
        raise UsageError(f"--max-failures must be at least 1, got {max_failures}.")
    failures = 0
    while True:
        trial = None
        try:
            try:
                trial = next_trial(w)
            except Exception as exc:  # the database went away while asking (Optuna's own retries ran out)
                if retrying.connection_error(exc) is None:
                    raise
                retrying.with_reconnect(
                    lambda: w.storage.get_study_id_from_name(w.study.study_name),
                    w.url,
                    getattr(w.storage, "retry_seconds", 0.0),
                )
                continue
            if trial is DONE:
                log.info(
                    "study %r reached its budget of %d finished trials",
                    w.study.study_name,
                    w.study.user_attrs["budget"],
                )
                return 0
            if trial is WAIT:
                time.sleep(poll_seconds)
                continue
            if before_trial is not None:
                before_trial()
            state = run_trial(w, trial, objective, on_end)
        except KeyboardInterrupt as exc:
            if isinstance(trial, optuna.Trial):
                with deferred_signals():
                    interrupt(w, trial, exc)
            raise
        failures = failures + 1 if state == TrialState.FAIL else 0
        if failures >= max_failures:
            trials = "1 trial" if failures == 1 else f"{failures} trials"
            raise WorkerStopped(
                f"{trials} in a row failed on this worker (see fail_reason on the trials); "
                "stopping instead of burning the budget: fix the cause and start the worker again."
            )


def run_worker(
    url: str,
    study_name: str | None,
    device: str = "cpu",
    *,
    max_failures: int = 3,
    poll_seconds: float = 2.0,
    data_root: str | None = None,
    relay=None,
    siblings: dict[str, int] | None = None,
) -> int:
    """Attach to a study and run NKAT trials on one device until its budget is reached.

    data_root, when given, replaces the study's data root: where the datasets lie is a property
    of the host, not of the search. relay, when given, is the queue of a parent process that draws
    the progress display (outputs/progress.py); without it this process shows its own. siblings: the
    workers by kind that the same command starts (hostshare.HostShare)."""
    from ..data.loader import load_splits
    from ..outputs.dashboard import annotate_trial
    from ..outputs.progress import Relay, StudyProgress
    from .hostshare import HostShare
    from .memory import recording_peak_memory
    from .objective import make_objective

    store = backends.open_storage(url, create=False)
    study, config = studies.attach(store, url, study_name)
    if data_root:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, root=data_root))
    cache: dict = {}

    def load(dataset: str):
        if dataset not in cache:
            cache[dataset] = load_splits(dataset, config.data, device)
        return cache[dataset]

    w = Worker(study, store, url, config)
    log.info("worker %s on %s: study %r in %s", worker_id(), device, study.study_name, urls.mask(url))

    def on_end(frozen: optuna.trial.FrozenTrial) -> None:
        annotate_trial(study, frozen)
        progress.trial_ended(frozen)

    # The workers of this host divide its cores between them; the display counts the study's
    # trials across all workers, without warm-start copies.
    view = Relay(relay) if relay is not None else StudyProgress(study, counted=lambda t: not studies.is_warm_start(t))
    with HostShare(device, siblings=siblings) as share, view as progress:
        return run_loop(
            w,
            recording_peak_memory(make_objective(config, load, progress), device),
            max_failures=max_failures,
            poll_seconds=poll_seconds,
            on_end=on_end,
            before_trial=share.threads_for_next_trial,
        )
