"""Device choice for --device and --gpus on machines with CUDA, Apple's MPS or neither (mocked)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from nkat_search import devices
from nkat_search.config import UsageError
from nkat_search.devices import parse_gpus, resolve_device


@pytest.fixture
def machine(monkeypatch):
    """machine(cuda=N, mps=bool): make torch see N CUDA devices and MPS or not."""

    def make(cuda: int = 0, mps: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return make


@pytest.mark.parametrize(
    "cuda, mps, expected",
    [
        (2, True, "cuda"),  # CUDA first, even beside MPS
        (1, False, "cuda"),
        (0, True, "mps"),
        (0, False, "cpu"),
    ],
)
def test_auto_prefers_cuda_then_mps_then_cpu(machine, cuda, mps, expected) -> None:
    machine(cuda=cuda, mps=mps)
    assert resolve_device("auto") == torch.device(expected)


@pytest.mark.parametrize(
    "name, cuda, mps, expected",
    [
        ("cpu", 2, True, "cpu"),
        ("cuda", 1, False, "cuda"),
        ("cuda:1", 2, False, "cuda:1"),
        ("mps", 0, True, "mps"),
        (" cuda:0 ", 1, False, "cuda:0"),
    ],
)
def test_explicit_devices_that_exist(machine, name, cuda, mps, expected) -> None:
    machine(cuda=cuda, mps=mps)
    assert resolve_device(name) == torch.device(expected)


@pytest.mark.parametrize(
    "name, cuda, mps, message",
    [
        ("cuda:2", 2, False, "device cuda:2 does not exist: this machine has 2 CUDA device(s); use --device cpu"),
        ("cuda", 0, True, "device cuda does not exist: this machine has 0 CUDA device(s)"),
        (
            "mps",
            1,
            False,
            "device mps does not exist: torch sees no Apple GPU (MPS) on this machine; use --device auto",
        ),
        ("gpu", 1, True, "device 'gpu' is not a device; use auto, cpu, cuda, cuda:N or mps."),
        ("meta", 0, False, "device 'meta' is not supported; use auto, cpu, cuda, cuda:N or mps."),
    ],
)
def test_missing_or_unknown_devices_are_one_sentence(machine, name, cuda, mps, message) -> None:
    machine(cuda=cuda, mps=mps)
    with pytest.raises(UsageError) as info:
        resolve_device(name)
    assert str(info.value).startswith(message)
    assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")


@pytest.mark.parametrize(
    "gpus, cuda, mps, expected",
    [
        (None, 3, True, ["cuda:0", "cuda:1", "cuda:2"]),  # every visible GPU
        (None, 0, True, ["mps"]),
        (None, 0, False, ["cpu"]),
        ("0,2", 3, False, ["cuda:0", "cuda:2"]),
        (" 1 ", 2, False, ["cuda:1"]),
        ("cpu", 2, True, ["cpu"]),
        ("mps", 0, True, ["mps"]),
    ],
)
def test_parse_gpus(machine, gpus, cuda, mps, expected) -> None:
    machine(cuda=cuda, mps=mps)
    assert parse_gpus(gpus) == expected


@pytest.mark.parametrize(
    "gpus, cuda, mps, message",
    [
        (
            "0,2",
            2,
            False,
            "GPU 2 does not exist: this machine has 2 visible GPU(s); use an index below that or --gpus cpu.",
        ),
        ("0", 0, True, "GPU 0 does not exist: this machine has 0 visible GPU(s)"),
        ("a,b", 2, False, "--gpus 'a,b' is not a list of GPU indices; use e.g. --gpus 0,1 or --gpus cpu."),
        ("-1", 2, False, "--gpus '-1' is not a list of GPU indices"),
        ("mps", 1, False, "device mps does not exist: torch sees no Apple GPU (MPS) on this machine"),
    ],
)
def test_parse_gpus_refuses_what_is_not_there(machine, gpus, cuda, mps, message) -> None:
    machine(cuda=cuda, mps=mps)
    with pytest.raises(UsageError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_gpus(gpus)


def test_mps_choice_logs_one_sentence_about_the_cpu_fallback(machine, monkeypatch, caplog) -> None:
    machine(cuda=0, mps=True)
    monkeypatch.setenv(devices.MPS_FALLBACK, "1")
    with caplog.at_level(logging.INFO, logger="nkat_search"):
        resolve_device("auto")
    (record,) = caplog.records
    assert "run on the CPU" in record.getMessage() and record.getMessage().count(". ") == 0
    caplog.clear()
    monkeypatch.setenv(devices.MPS_FALLBACK, "0")
    with caplog.at_level(logging.INFO, logger="nkat_search"):
        resolve_device("mps")
    (record,) = caplog.records
    assert "will stop the run; set PYTORCH_ENABLE_MPS_FALLBACK=1" in record.getMessage()


def test_enable_mps_fallback_before_torch_keeps_a_user_setting() -> None:
    # A fresh interpreter, as the command line starts: torch is not imported yet.
    code = (
        "import os, sys; from nkat_search.devices import enable_mps_fallback; "
        "assert 'torch' not in sys.modules; on = enable_mps_fallback(); "
        "print(on, os.environ['PYTORCH_ENABLE_MPS_FALLBACK'])"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != devices.MPS_FALLBACK}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["True", "1"]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**env, devices.MPS_FALLBACK: "0"}, check=True
    ).stdout
    assert out.split() == ["False", "0"]
