"""Plots of a tiny real study (HTML, PNG, optuna-dashboard) and attention maps of its retrained model."""

import argparse
import struct
from pathlib import Path

import pytest
from test_retrain import _one_thread, reported, tiny  # noqa: F401  (one tiny study and its report per session)

from nkat_search import cli, plots, storage
from nkat_search.config import UsageError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = ("optimization_history", "param_importances", "embed_dim_depth", "stage1_local_tpe",
             "stage1_learning_curves", "top_trials_accuracy")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def _attach(url):
    return storage.attach(storage.open_storage(url), url, None)


def test_plots_writes_html_png_and_dashboard_figures(tiny, tmp_path, capsys):
    _, url, _ = tiny
    args = argparse.Namespace(storage=url, study=None, out=str(tmp_path), no_png=False, no_dashboard=False)
    assert cli.cmd_plots(args) == 0
    for name in ALL_PLOTS:
        html = (tmp_path / f"{name}.html").read_text()
        assert "Plotly.newPlot" in html and 'src="plotly.min.js"' in html, name
        assert png_size(tmp_path / f"{name}.png") == (1000, 600), name
    assert (tmp_path / "plotly.min.js").stat().st_size > 1_000_000
    assert "left out" not in capsys.readouterr().out
    study, _ = _attach(url)
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    def stored():
        return study._storage.get_study_system_attrs(study._study_id)

    saved = get_plotly_graph_objects(stored())
    assert {f"nkat-{n.replace('_', '-')}" for n in ALL_PLOTS} <= set(saved)
    # A rerun on an unchanged study writes nothing new into the storage.
    before = stored()
    plots.write_plots(study, _attach(url)[1], tmp_path / "again", png=False)
    assert stored() == before


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
    args = argparse.Namespace(storage=url, study=None, trial=trial, dataset="cifar10", images=3,
                              out=str(tmp_path), artifacts=str(folder / "artifacts"))
    assert cli.cmd_attention(args) == 0
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
        plots.attention(study, config, never, "cifar10", 2, tmp_path, tmp_path / "artifacts")
    with pytest.raises(UsageError, match="has no trial 99"):
        plots.attention(study, config, 99, "cifar10", 2, tmp_path, tmp_path / "artifacts")


def test_plots_and_attention_flags():
    parser = cli.build_parser()
    assert parser.parse_args(["plots", "--no-png"]).func is cli.cmd_plots
    args = parser.parse_args(["attention", "--trial", "3"])
    assert args.func is cli.cmd_attention and args.dataset == "cifar10" and args.images == 10
