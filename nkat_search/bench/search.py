"""The search section: where a search's wall and CPU time go."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from ..data.loader import Splits, load_splits
from ..train import Timings
from .timing import _import_seconds, _precision_of

if TYPE_CHECKING:
    from ..search.study_file import StudyConfig


def _timed_storage(inner, timer: Timings):
    """`inner` with every storage call charged to the phase "storage <method>"."""
    import abc

    import optuna

    class TimedStorage(optuna.storages.BaseStorage):
        def __init__(self) -> None:
            self._inner = inner

        def __getattr__(self, name: str):
            return getattr(self._inner, name)

    def timed(name: str):
        method = getattr(inner, name)

        def call(self, *args, **kwargs):
            with timer.phase(f"storage {name}"):
                return method(*args, **kwargs)

        return call

    for name in dir(optuna.storages.BaseStorage):
        if not name.startswith("_") and callable(getattr(optuna.storages.BaseStorage, name)):
            setattr(TimedStorage, name, timed(name))
    # The loop above sets every public BaseStorage method and update_abstractmethods then clears the
    # abstract set: the class is concrete at runtime, which mypy cannot follow through setattr.
    concrete = cast("type[optuna.storages.BaseStorage]", TimedStorage)
    abc.update_abstractmethods(concrete)
    return concrete()


def _timed_pruner(inner, timer: Timings):
    import optuna

    class TimedPruner(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            with timer.phase("pruner"):
                return inner.prune(study, trial)

    return TimedPruner()


def bench_search(study_ref, trials: int, device: torch.device, share: bool = True) -> dict:
    """A search of `trials` trials of a study (a StudyConfig, a packaged name or a file) on a
    temporary journal, run by worker.run_loop (the loop `nkat-search worker` runs) with timers on
    the pieces: data, model build, train steps, evaluation, sampler, pruner, storage calls,
    dashboard note, and the rest of the loop. Each trial's row has its state and value. With
    share, the process joins the host's registry and takes its share of the cores before each
    trial, as a worker does; without, torch's threads stay as they are."""
    import optuna

    from ..search import worker
    from ..search.hostshare import HostShare
    from ..search.objective import make_objective
    from ..search.study_file import load_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = load_study(study_ref) if isinstance(study_ref, str) else study_ref
    startup = _import_seconds()
    timer = Timings()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"journal:{Path(tmp) / 'search.journal'}"
        started = time.perf_counter()
        study, store, config = _timed_study(url, config, trials, timer)
        attach_seconds = time.perf_counter() - started
        inner = make_objective(config, _timed_load(config, device, timer), timer=timer)

        def objective(trial) -> float:
            with timer.phase("objective"):
                return inner(trial)

        # From here on: the storage calls of attach above are not the loop's.
        begin = _stamp(timer)
        rows = _TrialRows(study, timer, begin)
        with HostShare(str(device)) if share else contextlib.nullcontext() as member:
            worker.run_loop(
                worker.Worker(study, store, url, config),
                objective,
                poll_seconds=0.1,
                on_end=rows.on_end,
                before_trial=member.threads_for_next_trial if member is not None else None,
            )
        total = _since(begin, _stamp(timer))
    return {
        "study": config.name,
        "trials": len(rows.rows),
        **total,
        "trials_per_minute": 60 * len(rows.rows) / total["seconds"],
        "storage_calls": _storage_calls(timer),
        "startup": {"import_seconds": startup, "open_and_attach_seconds": attach_seconds},
        "per_trial": rows.rows,
        "precision": dict(zip(("dtype", "reason"), _precision_of(config.train.precision, device))),
    }


class _TrialRows:
    """One row per finished trial: its state, value and the timers' phases since the last one."""

    def __init__(self, study, timer: Timings, begin: _Stamp) -> None:
        self.study, self.timer, self.mark = study, timer, begin
        self.rows: list[dict] = []

    def on_end(self, frozen) -> None:
        from ..outputs.dashboard import annotate_trial

        with self.timer.phase("dashboard note"):
            annotate_trial(self.study, frozen)
        now = _stamp(self.timer)
        self.rows.append(
            {
                "trial": frozen.number,
                "state": frozen.state.name,
                "value": frozen.value,
                "prune_reason": frozen.user_attrs.get("prune_reason"),
                **_since(self.mark, now),
            }
        )
        self.mark = now


def _timed_study(url: str, config: StudyConfig, trials: int, timer: Timings):
    """The study created on `url` and attached as a worker attaches, its storage calls and its
    pruner charged to `timer`: (study, timed storage, the StudyConfig stored on the study)."""
    from ..search import studies
    from ..storage import backends

    studies.create_or_resume(backends.open_storage(url), url, config, trials)
    store = _timed_storage(backends.open_storage(url, create=False), timer)
    study, config = studies.attach(store, url, config.name)
    study.pruner = _timed_pruner(study.pruner, timer)
    return study, store, config


def _timed_load(config: StudyConfig, device: torch.device, timer: Timings) -> Callable[[str], Splits]:
    """load(dataset) for the objective: each dataset's splits loaded once, as a worker does,
    every call charged to the phase "data"."""
    cache: dict = {}

    def load(dataset: str) -> Splits:
        with timer.phase("data"):
            if dataset not in cache:
                cache[dataset] = load_splits(dataset, config.data, device)
            return cache[dataset]

    return load


def _storage_calls(timer: Timings) -> dict:
    """Seconds and calls of each storage method, the costliest first."""
    return {
        k.removeprefix("storage "): {"seconds": timer.seconds[k], "calls": timer.calls[k]}
        for k in sorted(timer.seconds, key=lambda k: -timer.seconds[k])
        if k.startswith("storage ")
    }


# Wall and CPU seconds, then Timings.snapshot(): wall and CPU seconds by phase.
_Stamp = tuple[float, float, dict[str, float], dict[str, float]]


def _stamp(timer: Timings) -> _Stamp:
    return (time.perf_counter(), time.process_time(), *timer.snapshot())


def _since(before: _Stamp, now: _Stamp) -> dict:
    return _breakdown(now[0] - before[0], now[1] - before[1], _minus(now[2], before[2]), _minus(now[3], before[3]))


def _minus(now: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in now.items() if v - before.get(k, 0.0) > 0}


def _breakdown(wall: float, cpu: float, wall_phases: dict[str, float], cpu_phases: dict[str, float]) -> dict:
    """Wall and CPU seconds by phase (storage methods summed), the rest of the loop as its own phase,
    and the share of each that was not training steps."""
    out: dict[str, Any] = {"seconds": wall, "cpu_seconds": cpu}
    for key, total, phases in (("phases", wall, wall_phases), ("cpu_phases", cpu, cpu_phases)):
        grouped = _grouped(phases)
        grouped["worker loop (rest)"] = max(0.0, total - sum(grouped.values()))
        out[key] = grouped
    out["not_training"] = 1 - out["phases"].get("train steps", 0.0) / wall
    out["not_training_cpu"] = 1 - out["cpu_phases"].get("train steps", 0.0) / max(cpu, 1e-9)
    return out


def _grouped(phases: dict[str, float]) -> dict[str, float]:
    """Phases with the storage methods summed into one "storage" entry, largest first."""
    out: dict[str, float] = {}
    for name, seconds in phases.items():
        key = "storage" if name.startswith("storage ") else name
        out[key] = out.get(key, 0.0) + seconds
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
