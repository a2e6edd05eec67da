"""The two-stage objective: the gate at its boundary, pruning as Optuna's PRUNED state, measured attributes."""

import optuna
import pytest
from optuna.trial import TrialState

from nkat_search import storage as st
from nkat_search.study import load_study
from nkat_search.metrics import global_tpe
from nkat_search.objective import check_gate
from nkat_search.worker import run_worker


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
    store = st.open_storage(url)
    study = st.create_or_resume(store, url, load_study(path), trials)
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
    assert study.user_attrs["gate"]["threshold"] == 0.01
    assert study.metric_names == ["global_tpe"]


def test_trials_below_the_gate_are_pruned_with_the_reason_and_no_stage2(tiny_study, tmp_path):
    study = _run(tiny_study(gate=1e9), tmp_path, trials=2)
    for t in study.get_trials():
        assert t.state == TrialState.PRUNED  # Optuna's state, not a sentinel value
        assert t.user_attrs["prune_reason"].startswith("gate: local TPE")
        assert t.user_attrs["cifar10_local_tpe"] < 1e9
        assert "mnist_accuracy" not in t.user_attrs and "stage2_seconds" not in t.user_attrs
