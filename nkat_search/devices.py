"""Where a run computes: `--device` (one training run) and `--gpus` (the worker processes of a
search) resolved to CUDA, Apple's MPS or the CPU, with one sentence when a choice cannot be met.

MPS: torch lacks an MPS kernel for some operations. With PYTORCH_ENABLE_MPS_FALLBACK=1 such an
operation runs on the CPU (torch warns once per operation, naming it) instead of stopping the
run with NotImplementedError. torch reads the variable once, when it is imported, so the command
line calls enable_mps_fallback() before anything imports torch. Catching NotImplementedError
while building the model would not help: the missing kernels show up in the forward or backward
pass, and moving the whole run to the CPU there would hide a tenfold slowdown.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from .config import UsageError

log = logging.getLogger("nkat_search")


MPS_FALLBACK = "PYTORCH_ENABLE_MPS_FALLBACK"


def enable_mps_fallback() -> bool:
    """Let operations without an MPS kernel run on the CPU; True if it is in effect for this process.

    Call before torch is imported (torch reads the variable on import); a value the user set,
    0 included, is kept. Worker processes inherit it through the environment.
    """
    os.environ.setdefault(MPS_FALLBACK, "1")
    on = os.environ[MPS_FALLBACK].strip() not in ("", "0")
    if "torch" in sys.modules and on:
        # Too late for this process; children started afterwards still get it.
        log.debug("%s=1 set after torch was imported; it applies to processes started from here", MPS_FALLBACK)
        return False
    return on


def cuda_count() -> int:
    """CUDA devices this process sees (CUDA_VISIBLE_DEVICES applies); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def mps_available() -> bool:
    """Whether torch can use an Apple GPU through MPS here."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _note_mps() -> None:
    if os.environ.get(MPS_FALLBACK, "").strip() in ("", "0"):
        log.info(
            "device mps: an operation torch has no MPS kernel for will stop the run; set %s=1 to run "
            "such operations on the CPU",
            MPS_FALLBACK,
        )
    else:
        log.info(
            "device mps: operations torch has no MPS kernel for run on the CPU (%s=1; torch names each one once)",
            MPS_FALLBACK,
        )


def resolve_device(name: str) -> torch.device:
    """--device: auto -> CUDA, else MPS, else the CPU; cpu, cuda, cuda:N and mps when they exist here."""
    import torch

    name = name.strip()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            _note_mps()
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda":
        count = cuda_count()
        if (device.index or 0) >= count:
            raise UsageError(
                f"device {name} does not exist: this machine has {count} CUDA device(s); "
                "use --device cpu or an index below the count."
            )
    elif device.type == "mps":
        if not mps_available():
            raise UsageError(
                f"device {name} does not exist: torch sees no Apple GPU (MPS) on this machine; "
                "use --device auto or --device cpu."
            )
        _note_mps()
    elif device.type != "cpu":
        raise UsageError(f"device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps.")
    return device


def parse_gpus(gpus: str | None) -> list[str]:
    """--gpus: '0,2' -> cuda:0, cuda:2; 'cpu'; 'mps'; default: every visible GPU, else MPS, else the CPU."""
    count = cuda_count()
    if gpus is None:
        if count:
            return [f"cuda:{i}" for i in range(count)]
        return ["mps"] if mps_available() else ["cpu"]
    spec = gpus.strip()
    if spec in ("cpu", "mps"):
        return [str(resolve_device(spec))]
    devices = []
    for part in spec.split(","):
        if not part.strip().isdigit():
            raise UsageError(f"--gpus {gpus!r} is not a list of GPU indices; use e.g. --gpus 0,1 or --gpus cpu.")
        if int(part) >= count:
            raise UsageError(
                f"GPU {int(part)} does not exist: this machine has {count} visible GPU(s); "
                "use an index below that or --gpus cpu."
            )
        devices.append(f"cuda:{int(part)}")
    return devices


# CPU flags (Linux /proc/cpuinfo) that mean native bf16 arithmetic: AVX-512 BF16 and AMX-BF16.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...] | None:
    """The native-bf16 flags this CPU reports; None where the flags cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return tuple(flag for flag in NATIVE_BF16_FLAGS if flag in flags)


def choose_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None for fp32, why). auto: bf16 on CUDA and on CPUs with native bf16
    (avx512_bf16 or amx_bf16 in /proc/cpuinfo), fp32 elsewhere (other CPUs, MPS, non-Linux).

    Without native support the CPU emulates bf16 and gains nothing; with it the step runs about
    twice as fast at an accuracy within the seed spread of fp32 (docs/performance.md)."""
    import torch  # lazily, as everywhere in this module: see enable_mps_fallback

    if precision == "fp32":
        return None, "fp32 asked for"
    if precision == "bf16":
        return torch.bfloat16, "bf16 asked for"
    if device.type == "cuda":
        return torch.bfloat16, "auto: bf16 autocast on CUDA"
    if device.type != "cpu":
        return None, f"auto: fp32 on {device.type}"
    flags = cpu_bf16_flags()
    if flags is None:
        return None, "auto: fp32 (this OS does not show the CPU's flags, so native bf16 is not assumed)"
    if flags:
        return torch.bfloat16, f"auto: bf16 autocast, the CPU has native bf16 ({', '.join(flags)})"
    return None, "auto: fp32, the CPU has no native bf16 (neither avx512_bf16 nor amx_bf16)"


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32 (see choose_precision)."""
    return choose_precision(precision, device)[0]
