"""What a study holds, for people and programs: leaderboard, status (with the compute pruning
saved) and export of every trial."""

from __future__ import annotations

import statistics
import typing
from collections import Counter

import optuna
import pandas as pd
from optuna.trial import TrialState

from ..config import UsageError
from ..search.study_file import StudyConfig

METRICS = ("accuracy", "local_tpe", "params", "lambda")


def datasets_of(config: StudyConfig) -> list[str]:
    return [config.stage1_dataset, *config.stage2_datasets]


def leaderboard(study: optuna.Study, config: StudyConfig, top: int | None = None) -> pd.DataFrame:
    """Completed trials, best Global TPE first, with per-dataset accuracy, TPE, params and lambda.

    These are the columns of `leaderboard --format csv|json` (stable); format_leaderboard makes
    the table a person reads."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        row = {
            "trial": t.number,
            "global_tpe": t.value,
            "consistency": a.get("consistency"),
            "robustness": a.get("robustness"),
        }
        for d in datasets_of(config):
            row.update({f"{d}_{m}": a.get(f"{d}_{m}") for m in METRICS})
        row.update(t.params)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame = frame.sort_values("global_tpe", ascending=False, kind="stable").reset_index(drop=True)
    return frame.head(top) if top else frame


# Column headers of the narrow table: a dataset's accuracy is headed by its short name.
SHORT_NAMES = {"cifar10": "cifar10", "mnist": "mnist", "fashion_mnist": "fashion", "emnist_letters": "emnist"}


def size_and_accuracy(frame: pd.DataFrame, datasets: list[str]) -> pd.DataFrame:
    """trial, mean accuracy and lambda (mean over the datasets, as in Global TPE) and Global TPE."""
    return pd.DataFrame(
        {
            "trial": frame["trial"],
            "mean_accuracy": frame[[f"{d}_accuracy" for d in datasets]].mean(axis=1),
            "lambda": frame[[f"{d}_lambda" for d in datasets]].mean(axis=1),
            "global_tpe": frame["global_tpe"],
        }
    )


def format_leaderboard(frame: pd.DataFrame, config: StudyConfig, wide: bool = False) -> str:
    """The leaderboard as text. Narrow (the default, at most 100 characters a line for the four
    datasets): trial, Global TPE, consistency, robustness, each dataset's validation accuracy and
    lambda (M parameters, mean over the datasets). wide: every column of the frame."""
    if frame.empty:
        return "no completed trials yet"
    if wide:
        return frame.to_string(index=False, float_format=lambda v: f"{v:.4g}")
    datasets = datasets_of(config)
    table = pd.DataFrame(
        {
            "trial": frame["trial"],
            "global TPE": frame["global_tpe"],
            "consistency": frame["consistency"],
            "robustness": frame["robustness"],
        }
    )
    for d in datasets:
        table[SHORT_NAMES.get(d, d)] = frame[f"{d}_accuracy"]
    table["lambda"] = size_and_accuracy(frame, datasets)["lambda"]
    formats = {"global TPE": "{:.3f}", "consistency": "{:.3f}", "robustness": "{:.3f}", "lambda": "{:.4f}"}
    text = table.to_string(
        index=False, formatters={c: (formats.get(c, "{:.3f}").format if c != "trial" else str) for c in table.columns}
    )
    return "accuracy on the validation splits; lambda: M parameters, mean over the datasets\n" + text


def pareto(frame: pd.DataFrame, config: StudyConfig) -> pd.DataFrame:
    """Completed trials on the Pareto front of mean accuracy (higher is better) against lambda
    (lower is better), smallest first: no other trial is at least as accurate and at most as large
    and better in one of the two. `frame` is a leaderboard; columns as size_and_accuracy."""
    if frame.empty:
        return pd.DataFrame(columns=["trial", "mean_accuracy", "lambda", "global_tpe"])
    points = size_and_accuracy(frame, datasets_of(config))
    acc, lam = points["mean_accuracy"].to_numpy(), points["lambda"].to_numpy()
    dominated = [
        bool(((acc >= acc[i]) & (lam <= lam[i]) & ((acc > acc[i]) | (lam < lam[i]))).any()) for i in range(len(points))
    ]
    front = points[[not d for d in dominated]]
    return front.sort_values(["lambda", "mean_accuracy"], ascending=[True, False], kind="stable").reset_index(drop=True)


def format_pareto(front: pd.DataFrame) -> str:
    if front.empty:
        return "no completed trials yet"
    return "Pareto front of mean validation accuracy against lambda (smallest first)\n" + front.to_string(
        index=False,
        formatters={
            "trial": str,
            "mean_accuracy": "{:.3f}".format,
            "lambda": "{:.4f}".format,
            "global_tpe": "{:.3f}".format,
        },
    )


def status(study: optuna.Study, config: StudyConfig) -> dict:
    """Counts by state, budget, workers seen, and compute spent against what pruning saved.

    Saved compute is derived from measured times: a trial the pruner stopped after e of E Stage-1
    epochs would have cost its measured seconds per epoch times E; a trial the gate pruned would
    have gone on to Stage 2, which cost the completed trials their mean measured Stage-2 seconds.
    """
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    stage1 = sum(t.user_attrs.get("stage1_seconds", 0.0) for t in trials)
    stage2 = sum(t.user_attrs.get("stage2_seconds", 0.0) for t in trials)
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    mean_stage2 = statistics.fmean([t.user_attrs["stage2_seconds"] for t in completed]) if completed else None
    pruned = [t for t in trials if t.state == TrialState.PRUNED and "stage1_seconds" in t.user_attrs]
    spent_pruned = sum(t.user_attrs["stage1_seconds"] for t in pruned)
    full_stage1 = 0.0
    gate_pruned = 0
    for t in pruned:
        epochs_run = max(1, len(t.intermediate_values))
        full_stage1 += t.user_attrs["stage1_seconds"] / epochs_run * config.stage1_epochs
        gate_pruned += t.user_attrs.get("prune_reason", "").startswith("gate")
    best = max(completed, key=lambda t: typing.cast(float, t.value), default=None)  # cast: a COMPLETE trial has a value
    return {
        "study": study.study_name,
        "budget": study.user_attrs.get("budget"),
        "finished": counts["COMPLETE"] + counts["PRUNED"],
        "states": {s.name: counts[s.name] for s in TrialState},
        "workers_seen": sorted({t.user_attrs["worker"] for t in trials if "worker" in t.user_attrs}),
        "best_trial": best.number if best else None,
        "best_global_tpe": best.value if best else None,
        "seconds_stage1": stage1,
        "seconds_stage2": stage2,
        "seconds_pruned_trials": spent_pruned,
        "seconds_pruned_trials_if_full_stage1": full_stage1,
        "seconds_saved_by_pruner": full_stage1 - spent_pruned,
        "gate_pruned_trials": gate_pruned,
        "seconds_saved_by_gate": gate_pruned * mean_stage2 if mean_stage2 is not None else None,
    }


def format_status(s: dict) -> str:
    states = ", ".join(f"{k.lower()} {v}" for k, v in s["states"].items() if v)
    lines = [
        f"study {s['study']}: {s['finished']} of {s['budget']} finished ({states or 'no trials'})",
        f"workers seen: {len(s['workers_seen'])}",
    ]
    if s["best_trial"] is not None:
        lines.append(f"best: trial {s['best_trial']}, global TPE {s['best_global_tpe']:.4f}")
    lines.append(f"compute: {s['seconds_stage1']:.0f} s in Stage 1, {s['seconds_stage2']:.0f} s in Stage 2")
    lines.append(
        f"pruned trials used {s['seconds_pruned_trials']:.0f} s of Stage 1; full Stage-1 runs would have "
        f"cost {s['seconds_pruned_trials_if_full_stage1']:.0f} s (saved {s['seconds_saved_by_pruner']:.0f} s)"
    )
    if s["seconds_saved_by_gate"] is not None:
        lines.append(
            f"the gate stopped {s['gate_pruned_trials']} trials before Stage 2 "
            f"(about {s['seconds_saved_by_gate']:.0f} s at the mean measured Stage-2 time)"
        )
    return "\n".join(lines)


def export(study: optuna.Study, out: str) -> int:
    """Every trial with every parameter and attribute, as CSV or Parquet (by extension); rows written."""
    frame = study.trials_dataframe(multi_index=False)
    if out.endswith(".csv"):
        frame.to_csv(out, index=False)
    elif out.endswith(".parquet"):
        frame.to_parquet(out, index=False)
    else:
        raise UsageError(f"cannot tell the format of {out}; end the file name in .csv or .parquet.")
    return len(frame)
