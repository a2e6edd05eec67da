"""The leaderboard a person reads, the columns programs read, and the Pareto front of accuracy
against size, on studies built in memory (no training)."""

import json

import optuna
import pandas as pd
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from nkat_search.outputs import tables as report
from nkat_search.search.study_file import load_study

DATASETS = ["cifar10", "mnist", "fashion_mnist", "emnist_letters"]


@pytest.fixture(scope="module")
def smoke():
    return load_study("smoke")


def _trial(number_value: float, accuracy: float, lam: float, state=TrialState.COMPLETE, **extra):
    attrs = {"consistency": 0.81234, "robustness": 0.7, **extra}
    for i, d in enumerate(DATASETS):
        attrs.update(
            {
                f"{d}_accuracy": accuracy + 0.01 * i,
                f"{d}_local_tpe": 12.3456,
                f"{d}_params": int(lam * 1e6),
                f"{d}_lambda": lam,
            }
        )
    return create_trial(
        state=state,
        value=number_value if state == TrialState.COMPLETE else None,
        params={"embed_dim": 96, "lr": 1.2345e-3},
        distributions={"embed_dim": IntDistribution(80, 144, step=16), "lr": FloatDistribution(3e-4, 6e-3, log=True)},
        user_attrs=attrs,
    )


@pytest.fixture
def study():
    s = optuna.create_study(direction="maximize")
    for i in range(120):  # three-digit trial numbers, as in a long study
        s.add_trial(_trial(10.0 + i % 7, 0.4 + 0.001 * i, 0.1 + 0.002 * i))
    s.add_trial(_trial(0, 0.1, 0.1, state=TrialState.PRUNED))
    return s


def test_default_table_fits_100_columns_with_the_columns_a_person_needs(study, smoke):
    frame = report.leaderboard(study, smoke)
    text = report.format_leaderboard(frame, smoke)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    header = lines[1].split()
    assert header == [
        "trial",
        "global",
        "TPE",
        "consistency",
        "robustness",
        "cifar10",
        "mnist",
        "fashion",
        "emnist",
        "lambda",
    ]
    assert len(lines) == 2 + 120  # a note, the header, one line per completed trial
    # The first row is the best trial; lambda is the mean over the four datasets.
    best = frame.iloc[0]
    first = lines[2].split()
    assert int(first[0]) == best["trial"] and float(first[1]) == pytest.approx(best["global_tpe"], abs=5e-4)
    assert float(first[-1]) == pytest.approx(sum(best[f"{d}_lambda"] for d in DATASETS) / 4, abs=5e-5)
    assert float(first[4]) == pytest.approx(best["cifar10_accuracy"], abs=5e-4)


def test_wide_table_has_every_column(study, smoke):
    frame = report.leaderboard(study, smoke, top=3)
    text = report.format_leaderboard(frame, smoke, wide=True)
    header = text.splitlines()[0].split()
    assert header == list(frame.columns)
    assert "emnist_letters_params" in header and "lr" in header


def test_machine_columns_are_unchanged(study, smoke):
    frame = report.leaderboard(study, smoke)
    expected = ["trial", "global_tpe", "consistency", "robustness"]
    expected += [f"{d}_{m}" for d in DATASETS for m in ("accuracy", "local_tpe", "params", "lambda")]
    assert list(frame.columns) == expected + ["embed_dim", "lr"]
    record = json.loads(frame.head(1).to_json(orient="records"))[0]
    assert set(record) == set(expected + ["embed_dim", "lr"])
    assert list(frame["global_tpe"]) == sorted(frame["global_tpe"], reverse=True)


def test_empty_study_says_so(smoke):
    empty = optuna.create_study()
    frame = report.leaderboard(empty, smoke)
    assert report.format_leaderboard(frame, smoke) == "no completed trials yet"
    assert report.pareto(frame, smoke).empty


def _frame(points: dict[int, tuple[float, float]]) -> pd.DataFrame:
    """A leaderboard-shaped frame: trial -> (mean accuracy, lambda), equal on every dataset."""
    rows = []
    for trial, (acc, lam) in points.items():
        row = {"trial": trial, "global_tpe": acc / 0.05}
        row.update({f"{d}_accuracy": acc for d in DATASETS})
        row.update({f"{d}_lambda": lam for d in DATASETS})
        rows.append(row)
    return pd.DataFrame(rows)


def test_pareto_front_of_a_hand_made_frame(smoke):
    points = {
        0: (0.30, 0.10),  # smallest: on the front
        1: (0.25, 0.12),  # less accurate and larger than 0: dominated
        2: (0.45, 0.15),  # on the front
        3: (0.45, 0.20),  # as accurate as 2 but larger: dominated
        4: (0.60, 0.30),  # most accurate: on the front
        5: (0.50, 0.30),  # as large as 4, less accurate: dominated
        6: (0.45, 0.15),  # the same point as 2: neither dominates the other
        7: (0.30, 0.10),  # the same point as 0
    }
    front = report.pareto(_frame(points), smoke)
    assert list(front["trial"]) == [0, 7, 2, 6, 4]
    assert list(front["lambda"]) == sorted(front["lambda"])
    assert front.loc[front["trial"] == 4, "mean_accuracy"].item() == pytest.approx(0.60)
    # Accuracy rises along the front: a larger model is on it only by being more accurate.
    assert list(front["mean_accuracy"]) == sorted(front["mean_accuracy"])
    text = report.format_pareto(front)
    assert "Pareto front" in text.splitlines()[0] and len(text.splitlines()) == 2 + len(front)


def test_pareto_uses_the_mean_over_datasets(smoke):
    frame = _frame({0: (0.5, 0.2), 1: (0.5, 0.2)})
    # Trial 1 is better on one dataset only and smaller on another: it dominates trial 0.
    frame.loc[1, "mnist_accuracy"] = 0.6
    frame.loc[1, "emnist_letters_lambda"] = 0.1
    front = report.pareto(frame, smoke)
    assert list(front["trial"]) == [1]
    assert front["mean_accuracy"].item() == pytest.approx(0.525)
    assert front["lambda"].item() == pytest.approx(0.175)


@pytest.mark.parametrize(
    "flags, first_line",
    [
        ([], "accuracy on the validation splits; lambda: M parameters, mean over the datasets"),
        (["--wide"], "trial"),
        (["--pareto"], "Pareto front of mean validation accuracy against lambda (smallest first)"),
    ],
)
def test_leaderboard_command_table_wide_and_pareto(flags, first_line, study, smoke, monkeypatch, capsys):
    from nkat_search.cli import commands, main

    monkeypatch.setattr(commands, "_attach", lambda args: ("journal:x", study, smoke))
    args = main.build_parser().parse_args(["leaderboard", *flags])
    assert args.func(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].strip().startswith(first_line)
    if not flags:
        assert max(map(len, out)) <= 100
    if "--wide" in flags:
        assert "emnist_letters_local_tpe" in out[0]


def test_leaderboard_command_pareto_as_json(study, smoke, monkeypatch, capsys):
    from nkat_search.cli import commands, main

    monkeypatch.setattr(commands, "_attach", lambda args: ("journal:x", study, smoke))
    args = main.build_parser().parse_args(["leaderboard", "--pareto", "--format", "json"])
    assert args.func(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and set(rows[0]) == {"trial", "mean_accuracy", "lambda", "global_tpe"}
    assert [r["lambda"] for r in rows] == sorted(r["lambda"] for r in rows)
