"""Plots of a tiny real study (HTML, PNG, optuna-dashboard) and attention maps of its retrained model."""

import argparse
import math
import struct
from pathlib import Path

import optuna
import pytest
from retrained import one_thread

from nkat_search.cli import commands, main
from nkat_search.config import UsageError
from nkat_search.outputs import attention, dashboard, plots
from nkat_search.outputs import tables as report
from nkat_search.search import studies
from nkat_search.search.study_file import load_study
from nkat_search.storage import backends

pytestmark = [pytest.mark.optuna_api]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = (
    "optimization_history",
    "param_importances",
    "embed_dim_depth",
    "stage1_local_tpe",
    "stage1_learning_curves",
    "top_trials_accuracy",
    "accuracy_vs_size",
)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def _attach(url):
    return studies.attach(backends.open_storage(url), url, None)


@pytest.mark.browser  # kaleido draws the PNGs in Chromium or Chrome
def test_plots_writes_html_png_and_dashboard_figures(tiny, tmp_path, capsys):
    _, url, _ = tiny
    args = argparse.Namespace(storage=url, study=None, out=str(tmp_path), no_png=False, no_dashboard=False)
    assert commands.cmd_plots(args) == 0
    for name in ALL_PLOTS:
        html = (tmp_path / f"{name}.html").read_text()
        assert "Plotly.newPlot" in html and 'src="plotly.min.js"' in html, name
        assert png_size(tmp_path / f"{name}.png") == (1000, 600), name
    assert (tmp_path / "plotly.min.js").stat().st_size > 1_000_000
    assert "left out" not in capsys.readouterr().out
    study, _ = _attach(url)
    store = backends.open_storage(url)
    study_id = store.get_study_id_from_name(study.study_name)

    def stored():
        return store.get_study_system_attrs(study_id), optuna.load_study(
            study_name=study.study_name, storage=store
        ).user_attrs

    ids = {f"nkat-{n.replace('_', '-')}" for n in ALL_PLOTS}
    system, user = stored()
    assert set(user[dashboard.FIGURES_ATTR]) == ids
    # optuna-dashboard keeps each figure in study system attributes named after its id.
    assert all(any(key.startswith(f"dashboard:plot_data:{graph_id}:") for key in system) for graph_id in ids)
    # A rerun on an unchanged study writes nothing new into the storage.
    before = stored()
    plots.write_plots(study, _attach(url)[1], tmp_path / "again", png=False)
    after = stored()
    b, a = before[1][dashboard.FIGURES_ATTR], after[1][dashboard.FIGURES_ATTR]
    assert a == b, [k for k in b if a.get(k) != b[k]]
    assert after == before


def test_gate_figure_draws_the_study_gate(tiny):
    _, url, _ = tiny
    study, config = _attach(url)
    fig = plots.gate_figure(study, config)
    (line,) = fig.layout.shapes
    assert line.y0 == line.y1 == study.user_attrs["gate"]["threshold"] == config.gate
    points = sum(len(trace.x) for trace in fig.data)
    assert points == len(study.trials)


def test_attention_writes_one_png_per_image_and_a_summary(reported, tmp_path):
    folder, url, report = reported
    trial = report["trials"][0]["trial"]
    args = argparse.Namespace(
        storage=url,
        study=None,
        trial=trial,
        dataset="cifar10",
        images=3,
        out=str(tmp_path),
        artifacts=str(folder / "artifacts"),
    )
    assert commands.cmd_attention(args) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["attention_00.png", "attention_01.png", "attention_02.png", "summary.png"]
    for name in files:
        width, height = png_size(tmp_path / name)
        assert width > 100 and height > 100


def test_attention_without_a_report_says_to_run_report(tiny, tmp_path):
    _, url, _ = tiny
    study, config = _attach(url)
    never = next(t.number for t in study.trials if f"report:trial-{t.number}" not in study.user_attrs)
    with pytest.raises(UsageError, match="run `nkat-search report"):
        attention.attention(study, config, never, "cifar10", 2, tmp_path, tmp_path / "artifacts")
    with pytest.raises(UsageError, match="has no trial 99"):
        attention.attention(study, config, 99, "cifar10", 2, tmp_path, tmp_path / "artifacts")


def test_plots_and_attention_flags():
    parser = main.build_parser()
    assert parser.parse_args(["plots", "--no-png"]).func is commands.cmd_plots
    args = parser.parse_args(["attention", "--trial", "3"])
    assert args.func is commands.cmd_attention and args.dataset == "cifar10" and args.images == 10


# ---------------------------------------------------------------------------------------------
# Accuracy against size (an in-memory study: no training)


def _size_study(points: dict[int, tuple[float, float]]):
    """A study whose trial i has mean accuracy points[i][0] and lambda points[i][1] on the smoke
    study's four datasets; the missing numbers are pruned trials."""
    import optuna
    from optuna.distributions import IntDistribution
    from optuna.trial import TrialState, create_trial

    datasets = ["cifar10", "mnist", "fashion_mnist", "emnist_letters"]
    study = optuna.create_study(direction="maximize")
    for i in range(max(points, default=0) + 1):
        acc, lam = points.get(i, (0.1, 0.2))
        attrs = {f"{d}_{k}": v for d in datasets for k, v in (("accuracy", acc), ("lambda", lam))}
        state = TrialState.COMPLETE if i in points else TrialState.PRUNED
        study.add_trial(
            create_trial(
                state=state,
                value=acc / math.log10(1 + lam) if i in points else None,
                params={"embed_dim": 80 + 16 * (i % 5)},
                distributions={"embed_dim": IntDistribution(80, 144, step=16)},
                user_attrs=attrs,
            )
        )
    return study


def test_accuracy_vs_size_draws_every_completed_trial_the_front_and_iso_lines():
    points = {0: (0.30, 0.10), 1: (0.25, 0.12), 2: (0.45, 0.15), 4: (0.60, 0.30), 5: (0.50, 0.30)}
    study, config = _size_study(points), load_study("smoke")
    fig = plots.pareto_figure(study, config)
    traces = {t.name: t for t in fig.data}
    dots = traces["completed trial"]
    assert sorted(zip(dots.x, dots.y)) == sorted((lam, acc) for acc, lam in points.values())
    front = traces["Pareto front"]
    assert list(front.text) == ["0", "2", "4"] and list(front.x) == [0.10, 0.15, 0.30]
    iso = [t for name, t in traces.items() if name.startswith("Global TPE ")]
    assert len(iso) >= 2
    for line in iso:
        g = float(line.name.removeprefix("Global TPE "))
        assert all(abs(y - g * math.log10(1 + x)) < 1e-9 for x, y in zip(line.x, line.y))
    # The lines span the trials' Global TPE: some trial lies above the lowest line, some below the highest.
    tpes = [t.value for t in study.trials if t.value is not None]
    levels = sorted(float(t.name.removeprefix("Global TPE ")) for t in iso)
    assert levels[0] <= max(tpes) and levels[-1] >= min(tpes)
    assert "trial 4" in dots.text[[i for i, x in enumerate(dots.x) if x == 0.30 and dots.y[i] == 0.60][0]]


def test_accuracy_vs_size_is_left_out_without_completed_trials():
    study = _size_study({})
    assert plots.pareto_figure(study, load_study("smoke")) is None
    assert report.pareto(report.leaderboard(study, load_study("smoke")), load_study("smoke")).empty


@pytest.mark.parametrize(
    "values, expected",
    [
        ([3.1, 9.7], [2, 5, 10]),  # fewer than three round values inside: their neighbours join them
        ([3.0, 30.0], [5, 10, 20]),
        ([12.0, 13.0], [10, 20]),  # none inside: the ones on either side
        ([0.4, 0.45], [0.2, 0.5]),
        ([3.5, 13.0], [2, 5, 10, 20]),
        ([1.0, 1000.0], [1, 10, 100, 1000]),  # thinned to about `count` lines
    ],
)
def test_iso_levels_are_round_numbers_around_the_trials(values, expected):
    assert plots.iso_levels(values, count=4) == pytest.approx(expected)


def test_plots_need_no_scikit_learn(tiny, tmp_path, monkeypatch):
    # scikit-learn is a test dependency only (test_recipe's digits): the importance figure must not
    # need it, as Optuna's fANOVA evaluator would. None in sys.modules makes its import fail.
    import sys

    _, url, _ = tiny
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")] + ["sklearn"]:
        monkeypatch.setitem(sys.modules, name, None)
    result = plots.write_plots(*_attach(url), tmp_path, png=False, dashboard=False)
    assert (tmp_path / "param_importances.html").exists() and "param_importances" not in result["skipped"]
