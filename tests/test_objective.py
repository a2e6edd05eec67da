"""The two-stage objective: the gate at its boundary, pruning as Optuna's PRUNED state, measured attributes."""

import dataclasses

import optuna
import pytest
import torch
from optuna.trial import TrialState

from nkat_search.metrics import global_tpe
from nkat_search.search import studies
from nkat_search.search.objective import check_gate
from nkat_search.search.study_file import load_study
from nkat_search.search.worker import run_worker
from nkat_search.storage import backends


@pytest.mark.parametrize("tpe, pruned", [(0.5999, True), (0.60, False), (0.61, False), (0.0, True)])
def test_gate_at_the_boundary(tpe, pruned):
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    if pruned:
        with pytest.raises(optuna.TrialPruned):
            check_gate(tpe, 0.60, 3, trial)
        assert trial.user_attrs["prune_reason"].startswith("gate: local TPE")
        assert trial.user_attrs["pruned_at_epoch"] == 3
    else:
        check_gate(tpe, 0.60, 3, trial)
        assert "prune_reason" not in trial.user_attrs


def _run(path, tmp_path, trials):
    url = f"journal:{tmp_path / 's.journal'}"
    store = backends.open_storage(url)
    study = studies.create_or_resume(store, url, load_study(path), trials)
    assert run_worker(url, study.study_name, poll_seconds=0.1) == 0
    return study


def test_completed_trials_carry_measured_results_for_every_dataset(tiny_study, tmp_path):
    study = _run(tiny_study(gate=0.01), tmp_path, trials=2)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for t in trials:
        accs = [t.user_attrs[f"{d}_accuracy"] for d in ("cifar10", "mnist")]
        params = [t.user_attrs[f"{d}_params"] for d in ("cifar10", "mnist")]
        assert t.value == pytest.approx(global_tpe(accs, params))
        assert t.user_attrs["global_tpe"] == t.value
        assert 0 < t.user_attrs["robustness"] <= 1 and t.user_attrs["consistency"] <= 1
        assert t.user_attrs["stage1_seconds"] > 0 and t.user_attrs["stage2_seconds"] > 0
        assert list(t.intermediate_values) == [1]  # Stage-1 Local TPE reported per epoch
        assert t.user_attrs["torch_threads"] == torch.get_num_threads()  # what the CPU kernels ran with
    assert study.user_attrs["gate"]["threshold"] == 0.01
    assert study.metric_names == ["global_tpe"]


def test_trials_below_the_gate_are_pruned_with_the_reason_and_no_stage2(tiny_study, tmp_path):
    study = _run(tiny_study(gate=1e9), tmp_path, trials=2)
    for t in study.get_trials():
        assert t.state == TrialState.PRUNED  # Optuna's state, not a sentinel value
        assert t.user_attrs["prune_reason"].startswith("gate: local TPE")
        assert t.user_attrs["cifar10_local_tpe"] < 1e9
        assert "mnist_accuracy" not in t.user_attrs and "stage2_seconds" not in t.user_attrs


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


@pytest.mark.parametrize("gate, reason", [(1e9, "gate: "), (0.01, "pruner (none): local TPE 2.0000 at epoch 3")])
def test_after_the_last_stage1_epoch_the_gate_judges_before_the_pruner(tiny_study, monkeypatch, gate, reason):
    # A pruner that would stop every trial: in the middle of Stage 1 it stops the trial; after the
    # last epoch the gate speaks first, and the pruner may still stop a trial that passed it.
    from nkat_search.search import objective
    from nkat_search.train import FitResult

    def fake_fit(model_cfg, train_cfg, splits, on_epoch=None, timer=None):
        for epoch in range(1, train_cfg.epochs + 1):
            on_epoch(epoch, 0.2, 2.0)
        return FitResult("cifar10", 0.2, None, 1000, 0.001, 2.0, train_cfg.epochs, 0.1, 1.0, "float32", "cpu", 0)

    monkeypatch.setattr(objective, "fit", fake_fit)
    config = load_study(tiny_study(gate=gate))
    config = dataclasses.replace(config, stage1_epochs=3)
    run = objective.make_objective(config, load=lambda name: None)
    asked = []

    class CountingPruner(_AlwaysPrune):
        def prune(self, study, trial) -> bool:
            asked.append(max(trial.intermediate_values))
            return asked[-1] == 3  # only after the last epoch

    study = optuna.create_study(direction="maximize", pruner=CountingPruner())
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned):
        run(trial)
    assert trial.user_attrs["prune_reason"].startswith(reason)
    assert asked == ([1, 2] if gate > 1 else [1, 2, 3])
    # Mid-Stage-1, the pruner is asked and obeyed.
    study = optuna.create_study(direction="maximize", pruner=_AlwaysPrune())
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned):
        run(trial)
    assert trial.user_attrs["pruned_at_epoch"] == 1 and trial.user_attrs["prune_reason"].startswith("pruner")
