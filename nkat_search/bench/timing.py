"""Timing helpers every section shares: interleaved variants, device syncs, memory peaks."""

from __future__ import annotations

import functools
import importlib.util
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import torch

from ..config import DataConfig, UsageError
from ..data.loader import Splits, load_splits
from ..devices import choose_precision


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
        candidates = [Path(__file__).resolve().parents[2] / "benchmarks" / name, Path.cwd() / "benchmarks" / name]
    for candidate in candidates:
        if candidate.is_file():
            spec = importlib.util.spec_from_file_location("nkat_research_pipeline", candidate)
            if spec is None or spec.loader is None:  # no importer for the file's suffix (not .py)
                raise UsageError(f"--reference {candidate} is not a Python file; pass benchmarks/{name} of a checkout.")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            return module
    return None


NO_REFERENCE = "reference pipeline not available (benchmarks/research_pipeline.py of a source checkout; --reference)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cycle(iterable) -> Iterator:
    while True:
        yield from iterable


def interleaved(
    variants: dict[str, Callable[[], None]],
    images_per_call: int,
    calls: int,
    warmup: int,
    repeats: int,
    device: torch.device,
) -> dict[str, dict]:
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
    return load_splits(
        name, DataConfig(source="synthetic", val_size=val, synthetic_train=images + val, synthetic_test=1), device
    )


def _dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype or torch.float32).removeprefix("torch.")


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


def _precision_of(precision: str, device: torch.device) -> tuple[str, str]:
    dtype, reason = choose_precision(precision, device)
    return _dtype_name(dtype), reason


def _import_seconds() -> float:
    """Seconds a fresh Python process takes to import the worker's training stack (once per worker)."""
    code = "import nkat_search.search.worker, nkat_search.search.objective, nkat_search.outputs.dashboard, nkat_search.train"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
