import math

import pytest

from nkat_search.metrics import consistency, global_tpe, local_tpe, robustness


@pytest.mark.parametrize(
    "accuracy, params, expected",
    [
        (0.60, 8_900_000, 0.60 / math.log10(9.9)),  # seed-notes: embed 384, depth 5 needs 0.60
        (0.75, 12_614_999, 0.75 / math.log10(13.614999)),
        (0.0, 1_000_000, 0.0),
        (1.0, 9_000_000, 1.0),  # log10(10) = 1
    ],
)
def test_local_tpe_matches_definition(accuracy, params, expected):
    assert local_tpe(accuracy, params) == pytest.approx(expected, rel=1e-12)


def test_gate_table_from_seed_notes():
    # The CIFAR-10 accuracy needed for Local TPE 0.60 is 0.60 * log10(1 + lambda).
    for lam, needed in [(8.9, 0.60), (12.4, 0.68), (16.9, 0.75), (28.4, 0.88)]:
        assert 0.60 * math.log10(1 + lam) == pytest.approx(needed, abs=0.005)


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
