"""Several trials per GPU: `--trials-per-gpu K` plans K processes per device, each trial's peak GPU
memory is kept on it, and K processes that the study's measured peaks say cannot fit are refused.

No GPU runs here: torch.cuda's memory counters and the GPU's size are replaced by fakes, the rest is
the real code (argument parsing, the study in a real storage, the command's exit status)."""

from __future__ import annotations

import logging

import optuna
import pytest
import torch

from nkat_search.cli import commands
from nkat_search.cli.main import build_parser, main
from nkat_search.config import UsageError
from nkat_search.search import memory

MiB = 2**20


def plan(*argv: str) -> tuple[list[str], int]:
    return commands._plan(build_parser().parse_args(["worker", *argv]))


def test_trials_per_gpu_runs_k_processes_on_each_listed_device(monkeypatch):
    monkeypatch.setattr("nkat_search.devices.cuda_count", lambda: 2)
    devices, count = plan("--gpus", "0,1", "--trials-per-gpu", "3")
    assert (devices, count) == (["cuda:0", "cuda:1"], 6)
    assert memory.per_device(devices, count) == {"cuda:0": 3, "cuda:1": 3}
    assert plan("--gpus", "cpu", "--trials-per-gpu", "2") == (["cpu"], 2)
    assert plan("--gpus", "cpu") == (["cpu"], 1)
    with pytest.raises(UsageError, match="give one of them"):
        plan("--gpus", "cpu", "--trials-per-gpu", "2", "--workers", "2")


def test_check_fit_refuses_what_the_measured_peak_says_cannot_fit(caplog):
    total = {"cuda:0": 10_000, "cuda:1": 10_000}.__getitem__
    memory.check_fit(memory.Counter({"cuda:0": 4}), lambda: 2_000, total)  # 8,000 MiB of 9,000 usable
    with pytest.raises(UsageError) as refused:
        memory.check_fit(memory.Counter({"cuda:0": 1, "cuda:1": 5}), lambda: 2_000, total)
    assert "5 trials do not fit on cuda:1" in str(refused.value)
    assert "peaked at 2,000 MiB" in str(refused.value) and "--trials-per-gpu 4" in str(refused.value)
    memory.check_fit(memory.Counter({"cpu": 8}), lambda: 2_000, total)  # processes on the CPU share no GPU memory
    with caplog.at_level(logging.INFO, logger="nkat_search"):
        memory.check_fit(memory.Counter({"cuda:0": 8}), lambda: None, total)  # nothing measured yet: allowed, said
    assert "unchecked" in caplog.text


def test_each_completed_or_pruned_trial_keeps_its_peak_gpu_memory(monkeypatch):
    reset = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: reset.append(device))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 1536 * MiB)

    def objective(trial):
        if trial.number == 1:
            raise optuna.TrialPruned("gate")
        return 1.0

    study = optuna.create_study(direction="maximize")
    study.optimize(memory.recording_peak_memory(objective, "cuda:0"), n_trials=2)
    assert [t.user_attrs.get(memory.PEAK_ATTR) for t in study.trials] == [1536, 1536]
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED"] and reset == ["cuda:0", "cuda:0"]
    assert memory.largest_peak(study) == 1536
    assert memory.recording_peak_memory(objective, "cpu") is objective


def test_a_worker_with_more_trials_than_its_gpu_holds_exits_2_before_running_any(tmp_path, monkeypatch, capsys):
    url = f"journal:{tmp_path / 'study.journal'}"
    study = optuna.create_study(study_name="crowded", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.journal"))))  # fmt: skip
    study.enqueue_trial({})
    trial = study.ask()
    trial.set_user_attr(memory.PEAK_ATTR, 30_000)
    study.tell(trial, 1.0)
    monkeypatch.setattr("nkat_search.devices.cuda_count", lambda: 1)
    monkeypatch.setattr(memory, "gpu_total_mib", lambda device: 81_559)
    monkeypatch.setattr(commands, "_attach", lambda args: (url, study, None))
    ran = []
    monkeypatch.setattr(commands, "_run", lambda *a: ran.append(a) or 0)
    assert main(["worker", "--gpus", "0", "--trials-per-gpu", "3", "--storage", url]) == 2
    assert "3 trials do not fit on cuda:0" in capsys.readouterr().err and not ran
    assert main(["worker", "--gpus", "0", "--trials-per-gpu", "2", "--storage", url]) == 0 and len(ran) == 1
