"""`nkat-search bench`: where the time of training and of a whole search goes, measured on the
device it runs on.

Quick sections (the default): images per second of the real training step beside the bare model
step and the research-style pipeline; batched vs per-image augmentation; evaluation; ask+tell
latency of a storage; peak memory. Slow sections, asked for by name: `search` (a search of a
study through the worker's own loop, with the time of every trial split by phase), `share`
(smoke-sized trials in 1, 2, 3 concurrent CPU processes, with and without host sharing) and
`procs` (K concurrent training processes on one device).

Every comparison is taken within one run, side by side: the variants of a section run in turn
inside each repeat (real, bare, research, real, bare, research, ...) and each figure is the median
over the repeats, so a machine shared with other work slows them alike. Absolute figures move
with the machine's load; ratios taken in one run compare.

The research-style pipeline is a reference, not part of the package: benchmarks/
research_pipeline.py of a source checkout. Installed without it, the bench says so and leaves
those rows out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import multiprocessing
import os
import platform
import queue
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from .config import CONV_STEMS, PRECISIONS, DataConfig, ModelConfig, TrainConfig, UsageError, check_types, opt, replace
from .data import BatchLoader, Splits, load_splits
from .model import NKATViT
from .train import Timings, TrainStep, choose_precision, cpu_bf16_flags, evaluate, fit

# CPU: the batch of perf-notes. CUDA: large enough to keep an H100 busy with a 17-token model
# (see the README's learning-rate rule for batch sizes other than the recipe's 128).
DEFAULT_BATCH = {"cpu": 32, "cuda": 512, "mps": 128}
SECTIONS = ("train", "augment", "eval", "storage")  # quick; the default
SLOW_SECTIONS = ("search", "share", "procs")
ALL_SECTIONS = SECTIONS + SLOW_SECTIONS
# Concurrent processes of `share` (the CPU) and `procs` (one device) unless --processes says.
SHARE_PROCESSES, PROCS_PROCESSES = (1, 2, 3), (1, 2, 4)
MODEL = ModelConfig()


@dataclass(frozen=True)
class BenchOptions:
    """What `nkat-search bench` measures and how; the command's flags are made from these fields."""

    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    precision: str = opt("auto", "auto: bf16 autocast on CUDA and on CPUs with native bf16 (the table says "
                                 "which and why), else fp32", choices=PRECISIONS)
    batch_size: int | None = opt(None, "images per step [32 on the CPU, 512 on CUDA; 128 in procs]")
    steps: int = opt(4, "timed steps per variant per round")
    warmup: int = opt(2, "untimed steps per variant first")
    repeats: int = opt(3, "rounds; figures are their median")
    augment_batch: int = opt(512, "batch of the augment figure; GPU-sized, where the pipeline matters")
    threads: int | None = opt(None, "torch intra-op threads of this process; 1 is steadier on a shared machine "
                                    "[torch's default]")
    images: int = opt(1024, "synthetic training images (train, augment, procs)")
    eval_images: int = opt(256, "images per evaluation pass")
    conv_stem: str = opt(MODEL.conv_stem, "conv stem of the benchmarked model", choices=CONV_STEMS)
    patch_size: int = opt(MODEL.patch_size, "patch size of the benchmarked model")
    embed_dim: int = opt(MODEL.embed_dim, "embedding width of the benchmarked model")
    depth: int = opt(MODEL.depth, "blocks of the benchmarked model")
    compile: bool = opt(False, "torch.compile the model of the real step")
    storage: str | None = opt(None, "storage URL to time ask+tell on [a temporary journal file]")
    storage_procs: int = opt(8, "concurrent processes of the storage figure")
    storage_ops: int = opt(20, "ask+tell pairs per process")
    only: tuple[str, ...] = opt(SECTIONS, "sections to run: " + ", ".join(ALL_SECTIONS) + " (the last three "
                                          "take minutes)", choices=ALL_SECTIONS)
    search: bool = opt(False, "time a search of --study instead, through the worker's loop: where each "
                              "trial's time goes (the same as --only search)")
    study: str = opt("smoke", "study of the search and share sections: a packaged name or a file")
    trials: int = opt(12, "trials of the search section")
    processes: tuple[int, ...] | None = opt(None, "concurrent processes of share and procs "
                                                  "[share: 1 2 3; procs: 1 2 4]")
    jobs: int = opt(6, "training jobs per process count in share and procs")
    reference: str | None = opt(None, "file of the research-style pipeline [benchmarks/research_pipeline.py of "
                                      "this checkout, else of the working directory]")

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("steps", "repeats", "augment_batch", "images", "eval_images", "storage_procs", "storage_ops",
                     "trials", "jobs", "patch_size", "embed_dim", "depth"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        for name in ("warmup",):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name} must be at least 0, got {getattr(self, name)}.")
        for name in ("batch_size", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.processes is not None and (not self.processes or min(self.processes) < 1):
            raise UsageError("--processes takes one or more counts, each at least 1, e.g. --processes 1 2 4.")
        unknown = set(self.only) - set(ALL_SECTIONS)
        if unknown or not self.only:
            raise UsageError(f"--only takes sections among {', '.join(ALL_SECTIONS)}, got {' '.join(self.only)}.")

    @property
    def sections(self) -> tuple[str, ...]:
        return ("search",) if self.search else self.only

    def model(self) -> ModelConfig:
        return ModelConfig(conv_stem=self.conv_stem, patch_size=self.patch_size, embed_dim=self.embed_dim,
                           depth=self.depth)


# ---------------------------------------------------------------------------------------------
# The research-style reference


@functools.cache
def research_pipeline(path: str | None = None):
    """The research-style reference module (benchmarks/research_pipeline.py), or None when this
    installation has no source checkout beside it; a path that was given must exist."""
    name = "research_pipeline.py"
    if path is not None:
        candidates = [Path(path)]
        if not candidates[0].is_file():
            raise UsageError(f"--reference {path} is not a file; pass benchmarks/{name} of a checkout.")
    else:
        candidates = [Path(__file__).resolve().parent.parent / "benchmarks" / name, Path.cwd() / "benchmarks" / name]
    for candidate in candidates:
        if candidate.is_file():
            spec = importlib.util.spec_from_file_location("nkat_research_pipeline", candidate)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            return module
    return None


NO_REFERENCE = "reference pipeline not available (benchmarks/research_pipeline.py of a source checkout; --reference)"


# ---------------------------------------------------------------------------------------------
# Quick sections


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cycle(iterable) -> Iterator:
    while True:
        yield from iterable


def interleaved(variants: dict[str, Callable[[], None]], images_per_call: int, calls: int, warmup: int,
                repeats: int, device: torch.device) -> dict[str, dict]:
    """img/s of each variant: warm-up calls, then `repeats` rounds that run every variant in turn
    for `calls` calls; median and every round's figure."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            _sync(device)
            rounds[name].append(images_per_call * calls / (time.perf_counter() - start))
    return {name: {"img_per_s": statistics.median(r), "rounds": r} for name, r in rounds.items()}


def synthetic_splits(name: str, images: int, val: int, device: torch.device) -> Splits:
    return load_splits(name, DataConfig(source="synthetic", val_size=val, synthetic_train=images + val,
                                        synthetic_test=1), device)


def _dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype or torch.float32).removeprefix("torch.")


def bench_train(model_cfg: ModelConfig, train_cfg: TrainConfig, splits: Splits, *, steps: int, warmup: int,
                repeats: int, reference=None) -> dict:
    """The real step (TrainStep over BatchLoader, at train_cfg's precision) beside the bare step
    (fixed batch; forward, backward, AdamW) and, with a reference module, the research-style
    pipeline at fp32, as the research ran it. The real step also runs at the other precision where
    the device has native bf16, so both ratios are in the table."""
    device, batch = splits.train_x.device, train_cfg.batch_size
    if batch > len(splits.train_x):
        raise UsageError(f"batch size {batch} exceeds the {len(splits.train_x)} benchmark images; lower --batch-size.")
    torch.manual_seed(train_cfg.seed)
    loader = BatchLoader(splits.train_x, splits.train_y, splits.spec, batch, train=True, train_cfg=train_cfg,
                         seed=train_cfg.seed)
    batches = _cycle(loader)
    step = TrainStep(model_cfg, train_cfg, device, len(loader))
    step.model.train()
    losses: list[torch.Tensor] = []

    def real() -> None:
        losses.append(step(*next(batches)))

    fixed_x, fixed_y = next(iter(BatchLoader(splits.train_x, splits.train_y, splits.spec, batch, train=False)))

    def bare() -> None:
        with torch.autocast(device.type, dtype=step.autocast or torch.float32, enabled=step.autocast is not None):
            loss = step.criterion(step.model(fixed_x), fixed_y)
        step.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        step.optimizer.step()

    variants = {"real": real, "bare": bare}
    precision = {"real": _dtype_name(step.autocast), "bare": _dtype_name(step.autocast)}
    other = None
    if step.autocast is not None:
        other = replace(train_cfg, precision="fp32")
    elif device.type == "cpu" and cpu_bf16_flags():
        other = replace(train_cfg, precision="bf16")
    if other is not None:
        second = TrainStep(model_cfg, other, device, len(loader))
        second.model.train()
        name = "real_" + ("fp32" if other.precision == "fp32" else "bf16")
        variants[name] = lambda: losses.append(second(*next(batches)))
        precision[name] = _dtype_name(second.autocast)
    research = None
    if reference is not None:
        research = reference.ResearchStep(model_cfg, train_cfg, splits, batch, device, autocast=None)
        variants["research"] = research
        precision["research"] = "float32"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        out = interleaved(variants, batch, steps, warmup, repeats, device)
    finally:
        if research is not None:
            research.close()
    for name in out:
        out[name]["precision"] = precision[name]
    if not torch.isfinite(torch.stack(losses)).all():
        raise RuntimeError("the benchmark's training loss became non-finite; the figures would be meaningless.")
    speed = {name: fig["img_per_s"] for name, fig in out.items()}
    result = {"variants": out, "real_over_bare_cost": speed["bare"] / speed["real"]}
    if research is not None:
        result["real_over_research_speed"] = speed["real"] / speed["research"]
        if "real_fp32" in speed:
            result["real_fp32_over_research_speed"] = speed["real_fp32"] / speed["research"]
    else:
        result["research"] = NO_REFERENCE
    result["memory"] = peak_memory(device)
    return result


def bench_augment(splits: Splits, train_cfg: TrainConfig, *, batch: int, images: int, repeats: int,
                  reference=None) -> dict:
    """Batched on-device augmentation (BatchLoader) vs the same operations per image on PIL (the
    reference's pipeline)."""
    cfg = replace(train_cfg, mixup=0.0, cutmix=0.0)  # batch-level mixing has no per-image twin
    x, y = splits.train_x[:images], splits.train_y[:images]
    loader = BatchLoader(x, y, splits.spec, batch, train=True, train_cfg=cfg, seed=cfg.seed)
    n = len(loader) * min(batch, len(x))

    def batched() -> None:
        for _ in loader:
            pass

    variants = {"batched": batched}
    if reference is not None:
        dataset = reference.PILDataset(x, y, reference.pil_transform(splits.spec, cfg))

        def per_image() -> None:
            for i in range(n):
                dataset[i % len(dataset)]

        variants["pil"] = per_image
    out = interleaved(variants, n, 1, 1, repeats, x.device)
    if reference is not None:
        out["speedup"] = out["batched"]["img_per_s"] / out["pil"]["img_per_s"]
    else:
        out["pil"] = NO_REFERENCE
    out["batch"] = batch
    return out


def bench_eval(model_cfg: ModelConfig, splits: Splits, *, batch: int, repeats: int, precision: str) -> dict:
    """img/s of train.evaluate (the validation pass of every epoch)."""
    device = splits.val_x.device
    model = NKATViT(model_cfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    autocast, _ = choose_precision(precision, device)

    def run() -> None:
        evaluate(model, splits.val_x, splits.val_y, splits, batch, autocast)

    out = interleaved({"eval": run}, len(splits.val_y), 1, 1, repeats, device)["eval"]
    out["precision"] = _dtype_name(autocast)
    return out


def peak_rss_mib() -> float:
    """This process's peak resident set in MiB, on every OS."""
    try:
        import resource  # POSIX only
    except ImportError:  # Windows: the peak working set
        return psutil.Process().memory_info().peak_wset / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def peak_memory(device: torch.device) -> dict:
    """CUDA: max allocated since the last reset; otherwise the process's peak resident set."""
    if device.type == "cuda":
        return {"kind": "cuda_max_allocated", "mib": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"kind": "cpu_peak_rss", "mib": peak_rss_mib()}


def _storage_worker(url: str, study_name: str, ops: int, barrier, results) -> None:
    import optuna

    from .storage import open_storage

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

    from .storage import mask, open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = f"nkat-bench-{uuid.uuid4().hex[:8]}"
    storage = open_storage(url)
    optuna.create_study(study_name=name, storage=storage)
    # No torch work in the children: fork is safe and quick where the OS has it.
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
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
    items, deadline = [], time.monotonic() + timeout
    while len(items) < count:
        try:
            items.append(results.get(timeout=1.0))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a benchmark process ended with exit code {dead[0].exitcode}; "
                                   "its error is printed above.") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"benchmark processes gave {len(items)} of {count} results in {timeout:.0f} s.") from None
    return items


# ---------------------------------------------------------------------------------------------
# search: where a trial's time goes, through the worker's own loop


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
    abc.update_abstractmethods(TimedStorage)
    return TimedStorage()


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

    from . import storage as st
    from . import worker
    from .dashboard import annotate_trial
    from .hostshare import HostShare
    from .objective import make_objective
    from .study import load_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = load_study(study_ref) if isinstance(study_ref, str) else study_ref
    startup = _import_seconds()
    timer = Timings()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"journal:{Path(tmp) / 'search.journal'}"
        started = time.perf_counter()
        st.create_or_resume(st.open_storage(url), url, config, trials)
        raw = st.open_storage(url, create=False)
        store = _timed_storage(raw, timer)
        study, config = st.attach(store, url, config.name)
        study.pruner = _timed_pruner(study.pruner, timer)
        attach_seconds = time.perf_counter() - started
        cache: dict = {}

        def load(dataset: str) -> Splits:
            with timer.phase("data"):
                if dataset not in cache:
                    cache[dataset] = load_splits(dataset, config.data, device)
                return cache[dataset]

        inner = make_objective(config, load, timer=timer)

        def objective(trial) -> float:
            with timer.phase("objective"):
                return inner(trial)

        rows: list[dict] = []
        mark = [time.perf_counter(), time.process_time(), *timer.snapshot()]

        def on_end(frozen) -> None:
            with timer.phase("dashboard note"):
                annotate_trial(study, frozen)
            now = [time.perf_counter(), time.process_time(), *timer.snapshot()]
            rows.append({"trial": frozen.number, "state": frozen.state.name, "value": frozen.value,
                         "prune_reason": frozen.user_attrs.get("prune_reason"),
                         **_breakdown(now[0] - mark[0], now[1] - mark[1], _minus(now[2], mark[2]), _minus(now[3], mark[3]))})
            mark[:] = now

        # From here on: the storage calls of attach above are not the loop's.
        begin = [time.perf_counter(), time.process_time(), *timer.snapshot()]
        mark[:] = begin
        with HostShare(str(device)) if share else contextlib.nullcontext() as member:
            worker.run_loop(worker.Worker(study, store, url, config), objective, poll_seconds=0.1, on_end=on_end,
                            before_trial=member.threads_for_next_trial if share else None)
        end = [time.perf_counter(), time.process_time(), *timer.snapshot()]
        total = _breakdown(end[0] - begin[0], end[1] - begin[1], _minus(end[2], begin[2]), _minus(end[3], begin[3]))
    return {"study": config.name, "trials": len(rows), **total, "trials_per_minute": 60 * len(rows) / total["seconds"],
            "storage_calls": {k.removeprefix("storage "): {"seconds": timer.seconds[k], "calls": timer.calls[k]}
                              for k in sorted(timer.seconds, key=lambda k: -timer.seconds[k]) if k.startswith("storage ")},
            "startup": {"import_seconds": startup, "open_and_attach_seconds": attach_seconds},
            "per_trial": rows,
            "precision": dict(zip(("dtype", "reason"), _precision_of(config.train.precision, device)))}


def _minus(now: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in now.items() if v - before.get(k, 0.0) > 0}


def _breakdown(wall: float, cpu: float, wall_phases: dict[str, float], cpu_phases: dict[str, float]) -> dict:
    """Wall and CPU seconds by phase (storage methods summed), the rest of the loop as its own phase,
    and the share of each that was not training steps."""
    out = {"seconds": wall, "cpu_seconds": cpu}
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


def _precision_of(precision: str, device: torch.device) -> tuple[str, str]:
    dtype, reason = choose_precision(precision, device)
    return _dtype_name(dtype), reason


def _import_seconds() -> float:
    """Seconds a fresh Python process takes to import the worker's training stack (once per worker)."""
    code = "import nkat_search.worker, nkat_search.objective, nkat_search.dashboard, nkat_search.train"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# share and procs: concurrent training processes


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

    from .space import suggest

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    draws = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    jobs = []
    for _ in range(count):
        params = suggest(draws.ask(), study)
        stages = [(study.stage1_dataset, study.stage1_epochs)] + [(d, study.stage2_epochs) for d in study.stage2_datasets]
        jobs.append(Job(tuple((d, *study.configs_for(params, d, epochs)) for d, epochs in stages)))
    return jobs


def _trained_images(splits: Splits, cfg: TrainConfig) -> int:
    n = len(splits.train_y)
    steps = max(1, n // cfg.batch_size)
    return cfg.epochs * min(steps, cfg.limit_train or steps) * min(cfg.batch_size, n)


def _child(device: str, sharing: str, folder: str, cores: int, data: DataConfig, datasets: tuple[str, ...],
           warm: Job | None, jobs, barrier, results) -> None:
    """One concurrent benchmark process. sharing: "on" joins the host registry and takes its share
    of the cores before each job; "off" takes every core (torch's default in a fresh process,
    set explicitly so an inherited OMP_NUM_THREADS does not decide); "device" leaves torch as it is.
    warm: a job run once before the start, untimed (compilation, CUDA context and allocator)."""
    from .hostshare import HostShare

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
            results.put({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                         "images": images, "threads": threads, "pid": os.getpid()})
    finally:
        if share is not None:
            share.leave()


def run_concurrent(jobs: list[Job], count: int, *, device: str, sharing: str, data: DataConfig,
                   cores: int, folder: str, warm: bool = False) -> dict:
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
    procs = [ctx.Process(target=_child, args=(device, sharing, folder, cores, data, datasets, jobs[0] if warm else None,
                                              todo, barrier, results))
             for _ in range(count)]
    # The children start with SIGINT ignored (an ignored signal stays ignored across exec, and Python
    # then installs no handler of its own): Ctrl-C reaches the whole process group, and the parent
    # alone should handle it, not every child with a traceback from wherever its import was.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        for p in procs:
            p.start()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
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
    cpu = sum(r["cpu_seconds"] for r in done)
    return {"processes": count, "sharing": sharing, "jobs": len(jobs), "seconds": seconds, "cpu_seconds": cpu,
            "load_average": psutil.getloadavg()[0],
            "jobs_per_minute": 60 * len(jobs) / seconds, "jobs_per_cpu_minute": 60 * len(jobs) / cpu,
            "img_per_s": sum(r["images"] for r in done) / seconds, "threads": sorted({r["threads"] for r in done}),
            "job_seconds": statistics.median(r["seconds"] for r in done)}


def bench_share(study_ref: str, counts: tuple[int, ...], jobs: int) -> dict:
    """Smoke-sized trials (the study's space, unpruned) in 1, 2, 3 concurrent CPU processes, with
    host sharing (hostshare) and without (every process takes every core), side by side."""
    from .hostshare import host_cores
    from .study import load_study

    study = load_study(study_ref)
    work, cores = study_jobs(study, jobs), host_cores()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for count in counts:
            for sharing in ("on", "off"):
                rows.append(run_concurrent(work, count, device="cpu", sharing=sharing, data=study.data, cores=cores,
                                           folder=folder))
    base = next(r["jobs_per_minute"] for r in rows if r["processes"] == min(counts) and r["sharing"] == "on")
    for row in rows:
        row["vs_one_shared"] = row["jobs_per_minute"] / base
    return {"study": study.name, "cores": cores, "jobs": jobs, "rows": rows,
            "precision": dict(zip(("dtype", "reason"), _precision_of(study.train.precision, torch.device("cpu"))))}


def bench_procs(model_cfg: ModelConfig, device: torch.device, *, counts: tuple[int, ...], jobs: int, images: int,
                eval_images: int, batch: int, precision: str) -> dict:
    """K concurrent training processes on one device: aggregate img/s and jobs per hour, a job being
    one epoch of `images` synthetic CIFAR-10 images plus one evaluation (fit), after one untimed
    job per process. On CUDA also with the model compiled with mode="reduce-overhead" (CUDA
    graphs): a 17-token model is launch-bound there, which graphs and more processes both attack."""
    data = DataConfig(source="synthetic", val_size=eval_images, synthetic_train=images + eval_images, synthetic_test=1)
    run = ("cifar10", model_cfg, TrainConfig(epochs=1, warmup=0, batch_size=batch, precision=precision))
    variants = {"eager": None}
    if device.type == "cuda":
        variants["graphs"] = "reduce-overhead"
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for count in counts:
            for name, mode in variants.items():
                row = run_concurrent([Job((run,), mode)] * jobs, count, device=str(device), warm=True, data=data,
                                     sharing="device" if device.type != "cpu" else "on", cores=os.cpu_count() or 1,
                                     folder=folder)
                row["variant"] = name
                row["jobs_per_hour"] = 60 * row.pop("jobs_per_minute")
                rows.append(row)
    return {"batch": batch, "images_per_job": images, "rows": rows,
            "precision": dict(zip(("dtype", "reason"), _precision_of(precision, device)))}


# ---------------------------------------------------------------------------------------------
# Command


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(options: BenchOptions) -> dict:
    """Every section asked for, as one JSON-ready dict."""
    from .devices import resolve_device

    device = resolve_device(options.device)
    if options.threads:
        torch.set_num_threads(options.threads)
    sections = options.sections
    batch = options.batch_size or DEFAULT_BATCH.get(device.type, 128)
    model_cfg = options.model()
    train_cfg = TrainConfig(batch_size=batch, precision=options.precision, compile=options.compile)
    dtype, reason = choose_precision(options.precision, device)
    bf16 = cpu_bf16_flags()
    out: dict = {
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": {"name": cpu_name(), "cores": psutil.cpu_count() or os.cpu_count(),
                "native_bf16": list(bf16) if bf16 is not None else None},
        "precision": {"asked": options.precision, "dtype": _dtype_name(dtype), "reason": reason},
        "config": {"model": dataclasses.asdict(model_cfg), "batch_size": batch, "steps": options.steps,
                   "warmup": options.warmup, "repeats": options.repeats, "compile": options.compile,
                   "sections": list(sections)},
    }
    reference = research_pipeline(options.reference) if {"train", "augment"} & set(sections) else None
    if "storage" in sections:
        with tempfile.TemporaryDirectory() as tmp:
            url = options.storage or f"journal:{os.path.join(tmp, 'bench.journal')}"
            out["storage"] = bench_storage(url, options.storage_procs, options.storage_ops)
    if {"train", "augment", "eval"} & set(sections):
        splits = synthetic_splits("cifar10", max(options.images, batch), options.eval_images, device)
    if "augment" in sections:
        out["augment"] = bench_augment(splits, train_cfg, batch=options.augment_batch, images=options.images,
                                       repeats=options.repeats, reference=reference)
    if "eval" in sections:
        out["eval"] = bench_eval(model_cfg, splits, batch=batch, repeats=options.repeats, precision=options.precision)
    if "train" in sections:
        out["train"] = bench_train(model_cfg, train_cfg, splits, steps=options.steps, warmup=options.warmup,
                                   repeats=options.repeats, reference=reference)
        out["memory"] = out["train"].pop("memory")
    if "search" in sections:  # as a worker: its share of the host's cores, unless --threads says
        out["search"] = bench_search(options.study, options.trials, device, share=options.threads is None)
    if "share" in sections:
        out["share"] = bench_share(options.study, options.processes or SHARE_PROCESSES, options.jobs)
    if "procs" in sections:
        out["procs"] = bench_procs(model_cfg, device, counts=options.processes or PROCS_PROCESSES, jobs=options.jobs,
                                   images=options.images, eval_images=options.eval_images,
                                   batch=options.batch_size or TrainConfig().batch_size, precision=options.precision)
    return out


def table(result: dict) -> str:
    """The plain-text report of measure()'s result."""
    c, p, cpu = result["config"], result["precision"], result["cpu"]
    m = c["model"]
    lines = [f"device {result['device']} ({cpu['name']}, {cpu['cores']} cores), torch {result['torch']}, "
             f"{result['threads']} threads",
             f"precision: {p['dtype']} ({p['reason']})"]
    if {"train", "augment", "eval"} & set(c["sections"]):
        lines.append(f"model: stem {m['conv_stem']}, patch {m['patch_size']}, embed {m['embed_dim']}, depth "
                     f"{m['depth']}; batch {c['batch_size']}, {c['warmup']} warm-up + {c['repeats']} x {c['steps']} "
                     "steps, median of rounds")
    lines += ["", f"{'figure':<46} {'value':>14}  {'precision':<9} note"]

    def row(name: str, value: str, precision: str = "", note: str = "") -> None:
        lines.append(f"{name:<46} {value:>14}  {precision:<9} {note}".rstrip())

    if "train" in result:
        t = result["train"]
        v = t["variants"]
        labels = {"real": "train: real step (TrainStep + BatchLoader)", "bare": "train: bare model step",
                  "real_fp32": "train: real step at fp32", "real_bf16": "train: real step at bf16",
                  "research": "train: research-style pipeline (fp32)"}
        for name, fig in v.items():
            rel = v["bare"]["img_per_s"] / fig["img_per_s"]
            row(labels[name], f"{fig['img_per_s']:.1f} img/s", fig["precision"], f"{rel:.2f}x the bare step's time")
        row("train: real step cost over bare", f"{t['real_over_bare_cost']:.3f}x", "", "target <= 1.15")
        if "real_over_research_speed" in t:
            row("train: real speed over research", f"{t['real_over_research_speed']:.3f}x", v["real"]["precision"],
                "target >= 1.25")
        if "real_fp32_over_research_speed" in t:
            row("train: real fp32 speed over research", f"{t['real_fp32_over_research_speed']:.3f}x", "float32",
                "same precision as the research")
        if "research" in t:
            row("train: research-style pipeline", "-", "", t["research"])
    if "augment" in result:
        a = result["augment"]
        row("augment: batched on-device", f"{a['batched']['img_per_s']:.0f} img/s", "", f"batch {a['batch']}")
        if "speedup" in a:
            row("augment: per-image PIL", f"{a['pil']['img_per_s']:.0f} img/s")
            row("augment: speed-up", f"{a['speedup']:.1f}x", "", "target >= 10")
        else:
            row("augment: per-image PIL", "-", "", a["pil"])
    if "eval" in result:
        row("eval", f"{result['eval']['img_per_s']:.1f} img/s", result["eval"]["precision"])
    if "storage" in result:
        s = result["storage"]
        note = f"{s['procs']} processes x {s['ops_per_proc']} on {s['url']}"
        row("storage: ask+tell p50", f"{s['p50_ms']:.1f} ms", "", note)
        row("storage: ask+tell p95", f"{s['p95_ms']:.1f} ms", "", "target < 50 on local PostgreSQL, 8 processes")
    if "memory" in result:
        row(f"memory: peak ({result['memory']['kind']})", f"{result['memory']['mib']:.0f} MiB")
    if "search" in result:
        lines += ["", *_search_table(result["search"])]
    if "share" in result:
        lines += ["", *_share_table(result["share"])]
    if "procs" in result:
        lines += ["", *_procs_table(result["procs"])]
    return "\n".join(lines)


def _search_table(s: dict) -> list[str]:
    wall, cpu, n = s["seconds"], s["cpu_seconds"], max(1, s["trials"])
    lines = [f"search: {s['trials']} trials of {s['study']} in {wall:.1f} s = {s['trials_per_minute']:.2f} trials/min "
             f"({s['precision']['dtype']}); not training steps: {100 * s['not_training']:.1f}% of the wall time, "
             f"{100 * s['not_training_cpu']:.1f}% of the CPU time (target < 10%)",
             f"  once per worker: imports {s['startup']['import_seconds']:.1f} s, storage open and attach "
             f"{s['startup']['open_and_attach_seconds']:.2f} s",
             f"  {'phase':<28} {'wall s':>8} {'share':>6} {'CPU s':>8} {'share':>6} {'CPU s/trial':>11}"]
    for name, seconds in s["phases"].items():
        c = s["cpu_phases"].get(name, 0.0)
        lines.append(f"  {name:<28} {seconds:>8.2f} {100 * seconds / wall:>5.1f}% {c:>8.2f} {100 * c / cpu:>5.1f}% "
                     f"{c / n:>11.3f}")
    if "sampler" not in s["phases"]:
        lines.append("  (objective: the sampler's suggestions and the objective's own code)")
    calls = list(s["storage_calls"].items())[:5]
    if calls:
        lines.append("  storage, largest (wall s / calls): "
                     + ", ".join(f"{k} {v['seconds']:.2f} / {v['calls']}" for k, v in calls))
    lines.append(f"  {'trial':>5} {'state':<9} {'wall s':>7} {'CPU s':>7} {'not training (CPU)':>19}  largest CPU phases")
    for r in s["per_trial"]:
        top = sorted(r["cpu_phases"].items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"  {r['trial']:>5} {r['state']:<9} {r['seconds']:>7.2f} {r['cpu_seconds']:>7.2f} "
                     f"{100 * r['not_training_cpu']:>18.1f}%  " + ", ".join(f"{k} {v:.2f}" for k, v in top))
    return lines


def _share_table(s: dict) -> list[str]:
    lines = [f"share: {s['jobs']} unpruned {s['study']} trials per row on {s['cores']} cores ({s['precision']['dtype']}); "
             "on = hostshare, off = every process takes every core",
             f"  {'processes':>9} {'sharing':<8} {'trials/min':>10} {'vs 1 shared':>11} {'threads':>8} {'s/trial':>8} "
             f"{'trials/CPU-min':>14} {'load':>5}"]
    for r in s["rows"]:
        lines.append(f"  {r['processes']:>9} {r['sharing']:<8} {r['jobs_per_minute']:>10.2f} {r['vs_one_shared']:>10.2f}x "
                     f"{','.join(map(str, r['threads'])):>8} {r['job_seconds']:>8.1f} {r['jobs_per_cpu_minute']:>14.2f} "
                     f"{r['load_average']:>5.1f}")
    return lines


def _procs_table(s: dict) -> list[str]:
    lines = [f"procs: concurrent processes on one device; a job = 1 epoch of {s['images_per_job']} images at batch "
             f"{s['batch']} + 1 evaluation ({s['precision']['dtype']}); graphs = torch.compile(mode='reduce-overhead')",
             f"  {'processes':>9} {'variant':<9} {'img/s':>9} {'jobs/hour':>10} {'s/job':>7}"]
    for r in s["rows"]:
        lines.append(f"  {r['processes']:>9} {r['variant']:<9} {r['img_per_s']:>9.1f} {r['jobs_per_hour']:>10.0f} "
                     f"{r['job_seconds']:>7.1f}")
    return lines
