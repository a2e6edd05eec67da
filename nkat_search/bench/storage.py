"""The storage section: ask+tell latency of a storage under several processes."""

from __future__ import annotations

import multiprocessing
import os
import queue
import random
import time
import uuid
import warnings


def _storage_worker(url: str, study_name: str, ops: int, barrier, results) -> None:
    import optuna

    from ..storage.backends import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=open_storage(url))
    rng = random.Random(os.getpid())
    timings = []
    barrier.wait()
    # Optuna warns (UserWarning) that heartbeat storages are meant for Study.optimize; ask/tell is the point here.
    with warnings.catch_warnings(action="ignore", category=UserWarning):
        for i in range(ops + 1):
            start = time.perf_counter()
            trial = study.ask()
            trial.suggest_float("x", 0.0, 1.0)
            study.tell(trial, rng.random())
            if i:  # the first pair opens connections and caches: not a steady-state figure
                timings.append(time.perf_counter() - start)
    results.put(timings)


def bench_storage(url: str, procs: int, ops: int) -> dict:
    """ask+tell latency (p50, p95, ms) with `procs` processes on one throwaway study of `url`."""
    import optuna

    from ..storage.backends import open_storage
    from ..storage.urls import mask

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = f"nkat-bench-{uuid.uuid4().hex[:8]}"
    storage = open_storage(url)
    optuna.create_study(study_name=name, storage=storage)
    # No torch work in the children: fork is safe and quick where the OS has it.
    ctx = (
        multiprocessing.get_context("fork")
        if "fork" in multiprocessing.get_all_start_methods()
        else multiprocessing.get_context("spawn")
    )
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_storage_worker, args=(url, name, ops, barrier, results)) for _ in range(procs)]
    try:
        for w in workers:
            w.start()
        per_process = _collect(results, procs, workers, timeout=600)
        timings = sorted(1000 * seconds for timings_of_one in per_process for seconds in timings_of_one)
    finally:
        for w in workers:
            w.join(timeout=30)
        optuna.delete_study(study_name=name, storage=storage)
    pick = lambda q: timings[min(len(timings) - 1, int(q * len(timings)))]  # noqa: E731
    return {"url": mask(url), "procs": procs, "ops_per_proc": ops, "p50_ms": pick(0.50), "p95_ms": pick(0.95)}


def _collect(results, count: int, procs: list, timeout: float) -> list:
    """count items from a queue fed by procs; a process that died first is an error, not a hang."""
    items: list[object] = []
    deadline = time.monotonic() + timeout
    while len(items) < count:
        try:
            items.append(results.get(timeout=1.0))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(
                    f"a benchmark process ended with exit code {dead[0].exitcode}; its error is printed above."
                ) from None
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"benchmark processes gave {len(items)} of {count} results in {timeout:.0f} s."
                ) from None
    return items
