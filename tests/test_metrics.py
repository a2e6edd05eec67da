import math

import optuna
import pytest

from nkat_search.metrics import consistency, global_tpe, local_tpe, robustness
from nkat_search.search.objective import check_gate


@pytest.mark.parametrize(
    "accuracy, params, expected",
    [
        (0.60, 8_900_000, 0.60 / math.log10(9.9)),  # docs/research.md: embed 384, depth 5 needs 0.60
        (0.75, 12_614_999, 0.75 / math.log10(13.614999)),
        (0.0, 1_000_000, 0.0),
        (1.0, 9_000_000, 1.0),  # log10(10) = 1
    ],
)
def test_local_tpe_matches_definition(accuracy, params, expected):
    assert local_tpe(accuracy, params) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("lam, needed", [(8.9, 0.60), (12.4, 0.68), (16.9, 0.75), (28.4, 0.88)])
def test_gate_table_from_seed_notes(lam, needed):
    # docs/research.md: the CIFAR-10 accuracy a model of lambda M parameters needs to pass the 0.60 gate
    # (rounded to two places). One point below it is pruned by the objective's gate, one point
    # above passes.
    params = round(lam * 1e6)
    trial = _Trial()
    check_gate(local_tpe(needed + 0.01, params), 0.60, 10, trial)
    assert trial.attrs == {}
    with pytest.raises(optuna.TrialPruned, match="gate: local TPE"):
        check_gate(local_tpe(needed - 0.01, params), 0.60, 10, trial)
    assert trial.attrs["pruned_at_epoch"] == 10 and trial.attrs["prune_reason"].startswith("gate:")


class _Trial:
    def __init__(self):
        self.attrs = {}

    def set_user_attr(self, key, value):
        self.attrs[key] = value


def test_global_tpe_uses_mean_accuracy_over_log_of_mean_lambda():
    accs, params = [0.9, 0.8, 0.7, 0.6], [1_000_000, 2_000_000, 3_000_000, 10_000_000]
    # mean acc 0.75, mean lambda 4.0 -> 0.75 / log10(5)
    assert global_tpe(accs, params) == pytest.approx(0.75 / math.log10(5.0), rel=1e-12)
    # not the mean of the local TPEs
    assert global_tpe(accs, params) != pytest.approx(sum(map(local_tpe, accs, params)) / 4)


def test_global_tpe_of_one_dataset_is_its_local_tpe():
    assert global_tpe([0.7], [5_000_000]) == pytest.approx(local_tpe(0.7, 5_000_000))


def test_global_tpe_refuses_mismatched_lengths():
    with pytest.raises(ValueError):
        global_tpe([0.5, 0.6], [1_000_000])
    with pytest.raises(ValueError):
        global_tpe([], [])


def test_consistency_and_robustness_hand_computed():
    tpes = [0.6, 0.8, 1.0]  # mean 0.8, population std sqrt(0.08/3)
    assert consistency(tpes) == pytest.approx(1 - math.sqrt(0.08 / 3) / 0.8)
    assert robustness(tpes) == pytest.approx(0.75)


@pytest.mark.parametrize("fn", [consistency, robustness])
def test_zero_mean_gives_zero(fn):
    assert fn([0.0, 0.0, 0.0]) == 0.0


@pytest.mark.parametrize("fn", [consistency, robustness])
def test_single_dataset_is_perfectly_consistent(fn):
    assert fn([0.42]) == pytest.approx(1.0)
