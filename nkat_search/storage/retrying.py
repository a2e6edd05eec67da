"""RDBStorage that retries a dropped connection within a bound, and the stale-trial query.

Optuna's private API is used here and nowhere else; each use says why the public one does not do."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from ..config import RuntimeFailure
from .urls import mask, mask_text

log = logging.getLogger("nkat_search")


MAX_RETRY = 3


class StorageUnavailable(RuntimeFailure):
    """The database stayed unreachable past the retry bound (exit 1)."""


def connection_error(exc: BaseException | None) -> BaseException | None:
    """The driver's connection error behind exc (Optuna wraps it in StorageInternalError), if any."""
    import sqlalchemy.exc

    while exc is not None:
        if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) or getattr(
            exc, "connection_invalidated", False
        ):
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
                    "(its trial is failed and queued again by the next worker once the database is back)."
                ) from None
            detail = str(getattr(cause, "orig", None) or cause).strip().splitlines()
            log.warning(
                "database at %s unreachable (%s); retrying in %.1f s",
                mask(url),
                mask_text(detail[0], url) if detail else type(cause).__name__,
                delay,
            )
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
        attempts: list[int] = []

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
    def _set_trial_param(self, trial_id, param_name, param_value_internal, distribution, previous_distribution=None):
        def landed() -> bool:
            try:
                return RDBStorage.get_trial_param(self, trial_id, param_name) == param_value_internal
            except KeyError:
                return False

        return self._retrying(
            lambda: RDBStorage._set_trial_param(
                self, trial_id, param_name, param_value_internal, distribution, previous_distribution
            ),
            landed,
        )

    def set_trial_state_values(self, trial_id, state, values=None):
        def landed() -> bool:
            trial = RDBStorage.get_trial(self, trial_id)
            return trial.state == state and (values is None or list(trial.values or []) == list(values))

        return self._retrying(lambda: RDBStorage.set_trial_state_values(self, trial_id, state, values), landed)


def retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a failed trial again: same parameters, linked to the original the way Optuna's
    RetryFailedTrialCallback links it (system attrs failed_trial, retry_history), but without
    copying the failed attempt's user attributes (its partial results and fail_reason) onto the
    retry. At most MAX_RETRY retries of one original trial; a trial that never got parameters (asked
    from the sampler, not run) has no configuration to lose and nothing to repeat; a trial queued
    again already (its worker died after queueing it, before failing it) is not queued twice."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRY:
        log.warning("trial %d failed %d times; not queueing it again", history[0], len(history))
        return
    # A trial taken from the queue ([[enqueue]] or a retry of one) is queued again the way
    # enqueue_trial queues it, with the whole of its fixed_params: given up before its objective
    # ran, or killed after it set some of its parameters, it holds only part of them as params.
    fixed = trial.system_attrs.get("fixed_params")
    if not trial.params and not fixed:
        return
    if any(t.system_attrs.get("retry_history", [None])[-1] == trial.number for t in study.get_trials(deepcopy=False)):
        return  # see worker.fail_trial, which queues before it fails
    original = trial.system_attrs.get("failed_trial", trial.number)
    links = {"failed_trial": original, "retry_history": history}
    if fixed:  # a queued configuration: all of it, though the attempt may have set only some of it
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                user_attrs={"retry_of": original},
                system_attrs={**links, "fixed_params": {**fixed, **trial.params}},
            )
        )
    else:
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                params=trial.params,
                distributions=trial.distributions,
                user_attrs={"retry_of": original},
                system_attrs=links,
            )
        )


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
