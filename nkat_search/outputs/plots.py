"""The search in pictures, and what a retrained model looks at.

`plots`: Optuna's plotly figures (optimisation history, parameter importances, embed_dim x depth
contour) and ours (Stage-1 Local TPE per trial with the gate, Stage-1 learning curves of pruned
vs kept trials, per-dataset accuracy of the top trials, and every completed trial's mean accuracy
against its size with the Pareto front and Global TPE iso-lines), written as HTML and PNG
(kaleido) and attached to the study for optuna-dashboard (save_plotly_graph_object).

`attention`: class-token attention of every layer over validation images, from the weights that
`nkat-search report` saved for a trial (NKATViT.attention_maps).
"""

from __future__ import annotations

import logging
import math
import typing
from pathlib import Path

import optuna
import plotly.graph_objects as go
import plotly.io as pio
from optuna.trial import FrozenTrial, TrialState

from ..config import UsageError
from ..search.study_file import StudyConfig
from .tables import datasets_of, leaderboard, pareto, size_and_accuracy

log = logging.getLogger("nkat_search")


TOP_TRIALS = 5  # trials shown in the per-dataset accuracy plot


STATE_COLORS = {"COMPLETE": "#1f77b4", "PRUNED": "#d62728", "FAIL": "#7f7f7f", "RUNNING": "#2ca02c"}


# Prefix of our figures' ids in optuna-dashboard (a valid HTML id; reused, so a rerun overwrites).
DASHBOARD_ID = "nkat-{name}"


def _stage1_tpe(trial: FrozenTrial, dataset: str) -> float | None:
    """The Stage-1 Local TPE a trial ended with: the recorded one, else its last reported epoch."""
    value = trial.user_attrs.get(f"{dataset}_local_tpe")
    if value is None and trial.intermediate_values:
        value = trial.intermediate_values[max(trial.intermediate_values)]
    return value


def gate_figure(study: optuna.Study, config: StudyConfig) -> go.Figure | None:
    """Stage-1 Local TPE of each finished trial, coloured by state, with the gate as a line."""
    dataset, gate = config.stage1_dataset, config.gate
    fig = go.Figure()
    shown = 0
    for state in (TrialState.COMPLETE, TrialState.PRUNED):
        trials = [t for t in study.get_trials(deepcopy=False, states=(state,)) if _stage1_tpe(t, dataset) is not None]
        shown += len(trials)
        fig.add_trace(
            go.Scatter(
                x=[t.number for t in trials],
                y=[_stage1_tpe(t, dataset) for t in trials],
                mode="markers",
                name=state.name.lower(),
                marker={"color": STATE_COLORS[state.name], "size": 9},
                text=[t.user_attrs.get("prune_reason", "") for t in trials],
            )
        )
    if not shown:
        return None
    fig.add_hline(y=gate, line_dash="dash", line_color="black", annotation_text=f"gate {gate:g}")
    fig.update_layout(
        title=f"Stage-1 Local TPE on {dataset} per trial (gate {gate:g})",
        xaxis_title="trial",
        yaxis_title=f"Local TPE ({dataset}, validation)",
    )
    return fig


def learning_curves_figure(study: optuna.Study, config: StudyConfig) -> go.Figure | None:
    """Stage-1 Local TPE per epoch (the intermediate values), pruned trials against kept ones."""
    fig = go.Figure()
    legend: set[str] = set()
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if not t.intermediate_values:
            continue
        kind = "kept" if t.state == TrialState.COMPLETE else "pruned"
        epochs = sorted(t.intermediate_values)
        fig.add_trace(
            go.Scatter(
                x=epochs,
                y=[t.intermediate_values[e] for e in epochs],
                mode="lines+markers",
                name=kind,
                legendgroup=kind,
                showlegend=kind not in legend,
                hovertext=f"trial {t.number}",
                line={"color": STATE_COLORS[t.state.name]},
                opacity=0.8,
            )
        )
        legend.add(kind)
    if not legend:
        return None
    fig.add_hline(y=config.gate, line_dash="dash", line_color="black", annotation_text=f"gate {config.gate:g}")
    fig.update_layout(
        title=f"Stage-1 learning curves on {config.stage1_dataset}: pruned vs kept trials",
        xaxis_title="epoch",
        xaxis_dtick=1,
        yaxis_title="Local TPE (validation)",
    )
    return fig


def top_trials_figure(study: optuna.Study, config: StudyConfig, top: int = TOP_TRIALS) -> go.Figure | None:
    """Validation accuracy per dataset of the best completed trials (grouped bars)."""
    # cast: a COMPLETE trial of a single-objective study has a value
    done = sorted(
        study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
        key=lambda t: typing.cast(float, t.value),
        reverse=True,
    )[:top]
    if not done:
        return None
    datasets = datasets_of(config)
    fig = go.Figure(
        [
            go.Bar(
                name=f"trial {t.number} (Global TPE {t.value:.3g})",
                x=datasets,
                y=[t.user_attrs.get(f"{d}_accuracy") for d in datasets],
            )
            for t in done
        ]
    )
    fig.update_layout(
        barmode="group",
        title=f"Per-dataset validation accuracy of the top {len(done)} trials",
        xaxis_title="dataset",
        yaxis_title="accuracy",
        yaxis_range=[0, 1],
    )
    return fig


def iso_levels(values: list[float], count: int = 4) -> list[float]:
    """A few round Global TPE values spanning the completed trials' (1, 2 or 5 times a power of 10)."""
    low, high = min(values), max(values)
    if not low > 0:
        low = high / 10 if high > 0 else 1.0
    nice = sorted(
        {
            m * 10.0**e
            for e in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
            for m in (1, 2, 5)
        }
    )
    inside = [v for v in nice if low <= v <= high]
    if len(inside) < 3:
        below = [v for v in nice if v < low][-1:]
        above = [v for v in nice if v > high][:1]
        inside = below + inside + above
    step = max(1, math.ceil(len(inside) / count))
    return inside[::step]


def pareto_figure(study: optuna.Study, config: StudyConfig) -> go.Figure | None:
    """Every completed trial in the (lambda, mean accuracy) plane, the Pareto front, and Global TPE
    iso-lines (accuracy = g * log10(1 + lambda)): trials above a line beat it by accuracy, trials
    to the left by size."""
    frame = leaderboard(study, config)
    if frame.empty:
        return None
    points = size_and_accuracy(frame, datasets_of(config))
    front = pareto(frame, config)
    hover = _hover(frame, points, [p.name for p in config.space])
    fig = go.Figure()
    lam_max = float(points["lambda"].max()) * 1.15
    acc_max = min(1.0, float(points["mean_accuracy"].max()) * 1.15)
    _add_iso_lines(fig, list(points["global_tpe"]), lam_max, acc_max)
    fig.add_trace(
        go.Scatter(
            x=points["lambda"],
            y=points["mean_accuracy"],
            mode="markers",
            name="completed trial",
            marker={
                "color": points["global_tpe"],
                "colorscale": "Viridis",
                "size": 9,
                "showscale": True,
                "colorbar": {"title": "Global TPE"},
            },
            text=hover,
            hoverinfo="text",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=front["lambda"],
            y=front["mean_accuracy"],
            mode="lines+markers+text",
            name="Pareto front",
            line={"color": "#d62728", "shape": "hv"},
            marker={"color": "#d62728", "size": 11, "symbol": "circle-open"},
            text=[str(t) for t in front["trial"]],
            textposition="top left",
            hoverinfo="skip",
        )
    )
    fig.update_layout(
        title=f"Mean validation accuracy against size, {len(points)} completed trials "
        f"({len(front)} on the Pareto front; dotted: equal Global TPE)",
        xaxis_title="lambda (M parameters, mean over the datasets)",
        yaxis_title="mean validation accuracy",
        xaxis_range=[0, lam_max],
        yaxis_range=[0, acc_max],
        legend={"x": 0.01, "y": 0.99},
    )
    return fig


def _hover(frame, points, searched: list[str]) -> list[str]:
    """Each point's hover text: its trial, Global TPE and searched parameters."""
    params = {row["trial"]: row for row in frame.to_dict("records")}
    return [
        f"trial {t}<br>Global TPE {g:.3g}<br>"
        + "<br>".join(
            f"{k} {params[t][k]:.3g}" if isinstance(params[t][k], float) else f"{k} {params[t][k]}"
            for k in searched
            if k in params[t]
        )
        for t, g in zip(points["trial"], points["global_tpe"])
    ]


def _add_iso_lines(fig: go.Figure, values: list[float], lam_max: float, acc_max: float) -> None:
    """Dotted lines of equal Global TPE (accuracy = g * log10(1 + lambda)), each labelled."""
    lam = [lam_max * i / 100 for i in range(1, 101)]
    for g in iso_levels(values):
        fig.add_trace(
            go.Scatter(
                x=lam,
                y=[g * math.log10(1 + v) for v in lam],
                mode="lines",
                name=f"Global TPE {g:g}",
                line={"dash": "dot", "width": 1, "color": "#999999"},
                hoverinfo="name",
                showlegend=False,
            )
        )
        # Label each iso-line where it leaves the plot (at the top or the right edge).
        x_end = min(lam_max, 10 ** (0.995 * acc_max / g) - 1)  # just inside, or plotly hides the label
        fig.add_annotation(
            x=x_end,
            y=g * math.log10(1 + x_end),
            text=f"TPE {g:g}",
            showarrow=False,
            xanchor="right",
            yanchor="top" if x_end < lam_max else "bottom",
            font={"size": 10, "color": "#666666"},
        )


def figures(study: optuna.Study, config: StudyConfig) -> tuple[dict[str, go.Figure], dict[str, str]]:
    """(name -> figure, name -> why it was left out) for every plot of the study."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    made: dict[str, go.Figure] = {}
    skipped: dict[str, str] = {}
    vis = optuna.visualization
    if complete:
        made["optimization_history"] = vis.plot_optimization_history(study, target_name="Global TPE")
    else:
        skipped["optimization_history"] = "no completed trials yet"
    if len(complete) >= 2:
        # PED-ANOVA: deterministic, so an unchanged study gives the same figure (and a rerun writes
        # nothing), and it needs no scikit-learn; Optuna 4's default, fANOVA, is neither.
        made["param_importances"] = vis.plot_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), target_name="Global TPE"
        )
    else:
        skipped["param_importances"] = "needs at least two completed trials"
    searched = {p.name for p in config.space}
    if not {"embed_dim", "depth"} <= searched:
        skipped["embed_dim_depth"] = "embed_dim and depth are not both searched in this study"
    elif len(complete) >= 2:
        made["embed_dim_depth"] = vis.plot_contour(study, params=["embed_dim", "depth"], target_name="Global TPE")
        made["embed_dim_depth"].update_layout(title="Global TPE over embed_dim x depth (completed trials)")
    else:
        skipped["embed_dim_depth"] = "needs at least two completed trials"
    for name, build in (
        ("stage1_local_tpe", gate_figure),
        ("stage1_learning_curves", learning_curves_figure),
        ("top_trials_accuracy", top_trials_figure),
        ("accuracy_vs_size", pareto_figure),
    ):
        fig = build(study, config)
        if fig is None:
            skipped[name] = "no trial has the values it shows yet"
        else:
            made[name] = fig
    return made, skipped


def attach_to_dashboard(study: optuna.Study, figs: dict[str, go.Figure]) -> list[str]:
    """Save each figure on the study for optuna-dashboard (dashboard.save_figures: unchanged
    figures are not written again); returns their graph ids."""
    from . import dashboard

    return dashboard.save_figures(
        study, {DASHBOARD_ID.format(name=name.replace("_", "-")): fig for name, fig in figs.items()}
    )


def write_plots(
    study: optuna.Study, config: StudyConfig, out: str | Path, *, png: bool = True, dashboard: bool = True
) -> dict:
    """Write NAME.html (and NAME.png) per figure into out; returns what was written and skipped."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs, skipped = figures(study, config)
    written = []
    for name, fig in figs.items():
        # plotly.min.js once beside the pages: they open offline and stay small.
        fig.write_html(out / f"{name}.html", include_plotlyjs="directory")
        written.append(str(out / f"{name}.html"))
    if png and figs:
        paths = [out / f"{name}.png" for name in figs]
        if log.getEffectiveLevel() > logging.DEBUG:
            # kaleido and its browser driver log every step at INFO; keep them for -v.
            for name in ("kaleido", "choreographer"):
                logging.getLogger(name).setLevel(logging.WARNING)
        try:
            # One call renders every figure in one browser session (a few seconds, not a few per image).
            pio.write_images(list(figs.values()), paths, width=1000, height=600)
        except Exception as exc:  # kaleido raises its own errors when it cannot start a browser
            raise UsageError(
                f"kaleido could not write PNG files ({type(exc).__name__}: {exc}); install Chromium "
                "or Chrome (`plotly_get_chrome`), or pass --no-png for HTML only."
            ) from None
        written += [str(p) for p in paths]
    ids = attach_to_dashboard(study, figs) if dashboard and figs else []
    return {"written": written, "skipped": skipped, "dashboard": ids}
