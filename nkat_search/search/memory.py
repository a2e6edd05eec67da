"""Several trial processes on one GPU: each trial's peak GPU memory, measured and kept on the trial,
and a check that K processes per GPU fit before they start.

torch has the pieces (torch.cuda.max_memory_reserved, get_device_properties) but nothing that turns a
study's measured peaks into "K of these fit on that GPU": that is this module.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import optuna

from ..config import UsageError

log = logging.getLogger("nkat_search")

PEAK_ATTR = "peak_memory_mib"
# Reserved memory is what the process's caching allocator holds; each process also keeps a CUDA
# context of its own (several hundred MiB, not counted by the allocator), so K processes are asked
# to leave this share of the GPU free.
HEADROOM = 0.10


def recording_peak_memory(objective: Callable[[optuna.Trial], float], device: str) -> Callable[[optuna.Trial], float]:
    """The objective, with the trial's peak reserved GPU memory (MiB) kept as its user attribute
    peak_memory_mib when it completes or is pruned; on the CPU and MPS the objective itself."""
    if not device.startswith("cuda"):
        return objective
    import torch

    def record(trial: optuna.Trial) -> None:
        trial.set_user_attr(PEAK_ATTR, round(torch.cuda.max_memory_reserved(device) / 2**20))

    def run(trial: optuna.Trial) -> float:
        torch.cuda.reset_peak_memory_stats(device)
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            record(trial)
            raise
        record(trial)
        return value

    return run


def per_device(devices: list[str], count: int) -> Counter:
    """How many of count worker processes each device gets (process i runs on devices[i % len])."""
    return Counter(devices[i % len(devices)] for i in range(count))


def check_fit(processes: Counter, peak: Callable[[], int | None], total_mib: Callable[[str], int]) -> None:
    """Refuses (one sentence) more trial processes on a GPU than its memory holds, at the largest
    peak measured in the study (peak(), read only where a GPU gets more than one process); with no
    trial measured yet there is nothing to go by."""
    crowded = {device: k for device, k in processes.items() if device.startswith("cuda") and k > 1}
    if not crowded:
        return
    peak_mib = peak()
    if peak_mib is None:
        log.info("no trial of this study has a measured GPU memory peak yet; %s share their GPUs unchecked", crowded)
        return
    for device, k in crowded.items():
        usable = total_mib(device) * (1 - HEADROOM)
        if k * peak_mib > usable:
            fits = int(usable // peak_mib)
            raise UsageError(
                f"{k} trials do not fit on {device}: this study's trials peaked at {peak_mib:,} MiB of GPU "
                f"memory each, and {k} x {peak_mib:,} MiB is more than {1 - HEADROOM:.0%} of its "
                f"{total_mib(device):,} MiB; run at most {fits} trial(s) per GPU (--trials-per-gpu {max(fits, 1)})."
            )


def largest_peak(study: optuna.Study) -> int | None:
    """The largest peak_memory_mib of the study's trials, or None where no trial has one."""
    peaks = [t.user_attrs[PEAK_ATTR] for t in study.get_trials(deepcopy=False) if PEAK_ATTR in t.user_attrs]
    return max(peaks) if peaks else None


def gpu_total_mib(device: str) -> int:
    import torch

    return torch.cuda.get_device_properties(torch.device(device)).total_memory // 2**20
