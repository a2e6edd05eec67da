"""The share and procs sections: concurrent trial processes on one host or one device."""

from __future__ import annotations

import multiprocessing
import os
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass

import psutil
import torch

from ..config import DataConfig, ModelConfig, TrainConfig, replace
from ..data.loader import Splits, load_splits
from ..train import fit
from .storage import _collect
from .timing import _precision_of


@dataclass(frozen=True)
class Job:
    """A unit of training for the concurrency sections: (dataset, model, recipe) runs in turn,
    each a fit(); compile_mode compiles their models with that torch.compile mode."""

    runs: tuple[tuple[str, ModelConfig, TrainConfig], ...]
    compile_mode: str | None = None

    def run(self, splits: dict[str, Splits]) -> int:
        """Train every run; the images trained."""
        images = 0
        for dataset, model_cfg, train_cfg in self.runs:
            fit(model_cfg, train_cfg, splits[dataset], compile_mode=self.compile_mode)
            images += _trained_images(splits[dataset], train_cfg)
        return images


def study_jobs(study, count: int, seed: int = 0) -> list[Job]:
    """`count` trials of a study's space, drawn at random (seeded), each as the runs an unpruned
    trial trains: Stage 1, then every Stage-2 dataset."""
    import optuna

    from ..search.space import suggest

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    draws = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    jobs = []
    for _ in range(count):
        params = suggest(draws.ask(), study)
        stages = [(study.stage1_dataset, study.stage1_epochs)] + [
            (d, study.stage2_epochs) for d in study.stage2_datasets
        ]
        jobs.append(Job(tuple((d, *study.configs_for(params, d, epochs)) for d, epochs in stages)))
    return jobs


def _trained_images(splits: Splits, cfg: TrainConfig) -> int:
    n = len(splits.train_y)
    steps = max(1, n // cfg.batch_size)
    return cfg.epochs * min(steps, cfg.limit_train or steps) * min(cfg.batch_size, n)


def _child(
    device: str,
    sharing: str,
    folder: str,
    cores: int,
    data: DataConfig,
    datasets: tuple[str, ...],
    warm: Job | None,
    jobs,
    barrier,
    results,
) -> None:
    """One concurrent benchmark process. sharing: "on" joins the host registry and takes its share
    of the cores before each job; "off" takes every core (torch's default in a fresh process,
    set explicitly so an inherited OMP_NUM_THREADS does not decide); "device" leaves torch as it is.
    warm: a job run once before the start, untimed (compilation, CUDA context and allocator)."""
    from ..search.hostshare import HostShare

    share = HostShare(device, folder=folder, cores=cores) if sharing == "on" else None
    if share is not None:
        share.join()
    elif sharing == "off":
        torch.set_num_threads(cores)
    try:
        splits = {d: load_splits(d, data, device) for d in datasets}
        if warm is not None:
            warm.run(splits)
        barrier.wait()
        while (job := jobs.get()) is not None:
            threads = share.threads_for_next_trial() if share is not None else torch.get_num_threads()
            start, cpu = time.perf_counter(), time.process_time()
            images = job.run(splits)
            results.put(
                {
                    "seconds": time.perf_counter() - start,
                    "cpu_seconds": time.process_time() - cpu,
                    "images": images,
                    "threads": threads,
                    "pid": os.getpid(),
                }
            )
    finally:
        if share is not None:
            share.leave()


def run_concurrent(
    jobs: list[Job],
    count: int,
    *,
    device: str,
    sharing: str,
    data: DataConfig,
    cores: int,
    folder: str,
    warm: bool = False,
) -> dict:
    """Run `jobs` in `count` concurrent spawned processes that take them from one queue; wall time
    from the moment every process is ready (imports and data done; with warm, the first job run
    once, untimed) until the last job ends."""
    ctx = multiprocessing.get_context("spawn")
    todo, results, barrier = ctx.Queue(), ctx.Queue(), ctx.Barrier(count + 1)
    for job in jobs:
        todo.put(job)
    for _ in range(count):
        todo.put(None)
    datasets = tuple(sorted({run[0] for job in jobs for run in job.runs}))
    procs = [
        ctx.Process(
            target=_child,
            args=(device, sharing, folder, cores, data, datasets, jobs[0] if warm else None, todo, barrier, results),
        )
        for _ in range(count)
    ]
    _start_ignoring_sigint(procs)
    finished = False
    try:
        barrier.wait(timeout=900)
        start = time.perf_counter()
        done = _collect(results, len(jobs), procs, timeout=3600)
        seconds = time.perf_counter() - start
        finished = True
    except Exception as exc:
        # Ctrl-C inside multiprocessing's barrier can surface as the AssertionError of its lock's
        # release ("attempt to release recursive lock not owned by thread"), raised while handling
        # the KeyboardInterrupt: report the interrupt it is (one line from the CLI, exit 130).
        if isinstance(exc.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise
    finally:
        for p in procs:
            if not finished:
                p.terminate()
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    return _summary(done, count, sharing, len(jobs), seconds)


def _start_ignoring_sigint(procs: list) -> None:
    """Start the children with SIGINT ignored (an ignored signal stays ignored across exec, and
    Python then installs no handler of its own): Ctrl-C reaches the whole process group, and the
    parent alone should handle it, not every child with a traceback from wherever its import was."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        for p in procs:
            p.start()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def _summary(done: list[dict], count: int, sharing: str, jobs: int, seconds: float) -> dict:
    cpu = sum(r["cpu_seconds"] for r in done)
    return {
        "processes": count,
        "sharing": sharing,
        "jobs": jobs,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "load_average": psutil.getloadavg()[0],
        "jobs_per_minute": 60 * jobs / seconds,
        "jobs_per_cpu_minute": 60 * jobs / cpu,
        "img_per_s": sum(r["images"] for r in done) / seconds,
        "threads": sorted({r["threads"] for r in done}),
        "job_seconds": statistics.median(r["seconds"] for r in done),
    }


def bench_share(study_ref: str, counts: tuple[int, ...], jobs: int) -> dict:
    """Smoke-sized trials (the study's space, unpruned) in 1, 2, 3 concurrent CPU processes, with
    host sharing (hostshare) and without (every process takes every core), side by side."""
    from ..search.hostshare import host_cores
    from ..search.study_file import load_study

    study = load_study(study_ref)
    work, cores = study_jobs(study, jobs), host_cores()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for count in counts:
            for sharing in ("on", "off"):
                rows.append(
                    run_concurrent(
                        work, count, device="cpu", sharing=sharing, data=study.data, cores=cores, folder=folder
                    )
                )
    base = next(r["jobs_per_minute"] for r in rows if r["processes"] == min(counts) and r["sharing"] == "on")
    for row in rows:
        row["vs_one_shared"] = row["jobs_per_minute"] / base
    return {
        "study": study.name,
        "cores": cores,
        "jobs": jobs,
        "rows": rows,
        "precision": dict(zip(("dtype", "reason"), _precision_of(study.train.precision, torch.device("cpu")))),
    }


def bench_procs(
    model_cfg: ModelConfig,
    device: torch.device,
    *,
    counts: tuple[int, ...],
    jobs: int,
    images: int,
    eval_images: int,
    batch: int,
    precision: str,
) -> dict:
    """K concurrent training processes on one device: aggregate img/s and jobs per hour, a job being
    one epoch of `images` synthetic CIFAR-10 images plus one evaluation (fit), after one untimed
    job per process. On CUDA both eager (graphs = "off") and with each training iteration replayed
    as a CUDA graph (graphs = "auto", iteration.py): a 17-token model is launch-bound there, which
    graphs and more processes both attack."""
    data = DataConfig(source="synthetic", val_size=eval_images, synthetic_train=images + eval_images, synthetic_test=1)
    recipe = TrainConfig(epochs=1, warmup=0, batch_size=batch, precision=precision, graphs="off")
    variants = {"eager": recipe}
    if device.type == "cuda":
        variants["graphs"] = replace(recipe, graphs="auto")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for count in counts:
            for name, train_cfg in variants.items():
                row = run_concurrent(
                    [Job((("cifar10", model_cfg, train_cfg),))] * jobs,
                    count,
                    device=str(device),
                    warm=True,
                    data=data,
                    sharing="device" if device.type != "cpu" else "on",
                    cores=os.cpu_count() or 1,
                    folder=folder,
                )
                row["variant"] = name
                row["jobs_per_hour"] = 60 * row.pop("jobs_per_minute")
                rows.append(row)
    return {
        "batch": batch,
        "images_per_job": images,
        "rows": rows,
        "precision": dict(zip(("dtype", "reason"), _precision_of(precision, device))),
    }
