"""optuna-dashboard for our studies: Markdown notes (the study's definition, each trial's results)
saved with optuna_dashboard.save_note, our figures saved with save_plotly_graph_object, and
serving the dashboard on a storage together with the artifact store of `nkat-search report`."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
import optuna_dashboard
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    import plotly.graph_objects as go
from ..config import UsageError

log = logging.getLogger("nkat_search")


# (user attribute suffix, column title) of the per-dataset table; objective.record() sets these.
DATASET_COLUMNS = (
    ("accuracy", "accuracy"),
    ("local_tpe", "local TPE"),
    ("params", "params"),
    ("lambda", "lambda"),
    ("seconds", "seconds"),
    ("epochs", "epochs"),
)


# Study user attribute: {graph object id: sha256 of the figure's JSON} of the figures saved for
# the dashboard. optuna-dashboard has no public reader of saved figures, so this is how a rerun
# of `plots` on an unchanged study knows to write nothing.
FIGURES_ATTR = "dashboard_figures"


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}"


def _kwargs(d: dict) -> str:
    kind = d.get("kind", "?")
    rest = ", ".join(f"{k}={v}" for k, v in d.items() if k != "kind")
    return f"`{kind}`" + (f" ({rest})" if rest else "")


def study_note(definition: dict, budget: int) -> str:
    """The study note: search space, gate, budgets, datasets, sampler and pruner, in Markdown.

    definition is StudyConfig.definition(), the study file's shape."""
    stage1, stage2 = definition["stage1"], definition["stage2"]
    lines = [
        f"## {definition['study']['name']}",
        "",
        "Maximize the Global TPE over the Stage-1 dataset and the Stage-2 datasets.",
        "",
        "### Search space",
        "",
        "| parameter | type | range or choices | step | log |",
        "|---|---|---|---|---|",
    ]
    for name, p in definition["space"].items():
        span = ", ".join(map(str, p["choices"])) if p["type"] == "categorical" else f"[{p['low']}, {p['high']}]"
        log_scale = "yes" if p.get("log") else "no"
        lines.append(f"| {name} | {p['type']} | {span} | {_fmt(p.get('step'))} | {log_scale} |")
    lines += [
        "",
        "### Stages and budget",
        "",
        f"- Stage 1: {stage1['dataset']}, {stage1['epochs']} epochs; "
        f"gate: local TPE >= {stage1['gate']} after Stage 1, else the trial is pruned",
        f"- Stage 2: {', '.join(stage2['datasets']) or 'none'}, {stage2['epochs']} epochs each",
        f"- Trial budget: {budget} trials",
        f"- Sampler: {_kwargs(definition['sampler'])}",
        f"- Pruner: {_kwargs(definition['pruner'])}",
        f"- Data source: {definition.get('data', {}).get('source', '-')}",
    ]
    return "\n".join(lines) + "\n"


def trial_note(trial: FrozenTrial, datasets: Sequence[str] | None = None) -> str:
    """The trial note: per-dataset results, then the study metrics (COMPLETE) or why it stopped."""
    attrs = trial.user_attrs
    found = [k[: -len("_accuracy")] for k in attrs if k.endswith("_accuracy")]
    # The study's dataset order when given; datasets a trial never reached are left out.
    names = [d for d in datasets if d in found] if datasets is not None else found
    lines = [f"## Trial {trial.number}: {trial.state.name}", ""]
    if names:
        lines += [
            "| dataset | " + " | ".join(title for _, title in DATASET_COLUMNS) + " |",
            "|---" * (len(DATASET_COLUMNS) + 1) + "|",
        ]
        for d in names:
            lines.append(f"| {d} | " + " | ".join(_fmt(attrs.get(f"{d}_{k}")) for k, _ in DATASET_COLUMNS) + " |")
        lines.append("")
    if trial.state == TrialState.COMPLETE:
        lines += [
            f"- Global TPE: {_fmt(trial.value)}",
            f"- Consistency: {_fmt(attrs.get('consistency'))}",
            f"- Robustness: {_fmt(attrs.get('robustness'))}",
        ]
    elif trial.state == TrialState.PRUNED:
        at = f" (epoch {attrs['pruned_at_epoch']})" if "pruned_at_epoch" in attrs else ""
        lines.append(f"- Pruned{at}: {attrs.get('prune_reason', 'no reason recorded')}")
    elif trial.state == TrialState.FAIL:
        lines.append(f"- Failed: {attrs.get('fail_reason', 'no reason recorded')}")
    for key, title in (
        ("stage1_seconds", "Stage-1 seconds"),
        ("stage2_seconds", "Stage-2 seconds"),
        ("worker", "Worker"),
    ):
        if key in attrs:
            lines.append(f"- {title}: {_fmt(attrs[key])}")
    return "\n".join(lines) + "\n"


def _save(target: optuna.Study | optuna.Trial, body: str) -> None:
    # save_note bumps the note's version on every call; skip unchanged notes so that repeated
    # annotation does not grow a journal file.
    if optuna_dashboard.get_note(target) != body:
        optuna_dashboard.save_note(target, body)


def annotate_study(study: optuna.Study) -> None:
    """Save (or rewrite, on resume) the study note from the study's stored definition and budget."""
    definition, budget = study.user_attrs.get("definition"), study.user_attrs.get("budget")
    if definition is None or budget is None:
        raise UsageError(
            f"study {study.study_name!r} has no definition or budget (it was not made by "
            "nkat-search start); create it with `nkat-search start`."
        )
    _save(study, study_note(definition, budget))


def annotate_trial(study: optuna.Study, trial: FrozenTrial | optuna.Trial | int) -> None:
    """Save (or rewrite) a trial's note; trial is a FrozenTrial, a live Trial, or a trial number."""
    if isinstance(trial, FrozenTrial):
        frozen = trial
    else:
        number = trial.number if isinstance(trial, optuna.Trial) else trial
        trials = study.get_trials(deepcopy=False)
        if not 0 <= number < len(trials):
            raise UsageError(
                f"study {study.study_name!r} has no trial {number} (it has {len(trials)} trials); "
                "pass the number of one of its trials."
            )
        frozen = trials[number]
    definition = study.user_attrs.get("definition") or {}
    datasets = [definition["stage1"]["dataset"], *definition["stage2"]["datasets"]] if definition else None
    # save_note takes a Study or a Trial and reads only the trial's storage, study and id, so a
    # Trial handle on the finished trial is how a FrozenTrial gets a note (no sampling happens).
    # Optuna has no public accessor of a FrozenTrial's storage id, hence `_trial_id`.
    handle = trial if isinstance(trial, optuna.Trial) else optuna.Trial(study, frozen._trial_id)
    _save(handle, trial_note(frozen, datasets))


def save_figures(study: optuna.Study, figs: Mapping[str, go.Figure]) -> list[str]:
    """Save each figure on the study for optuna-dashboard under its id; unchanged ones are not rewritten."""
    saved = dict(study.user_attrs.get(FIGURES_ATTR, {}))
    for graph_id, fig in figs.items():
        digest = hashlib.sha256(fig.to_json().encode()).hexdigest()
        if saved.get(graph_id) != digest:
            optuna_dashboard.save_plotly_graph_object(study, fig, graph_object_id=graph_id)
            saved[graph_id] = digest
    if saved != study.user_attrs.get(FIGURES_ATTR, {}):
        study.set_user_attr(FIGURES_ATTR, saved)
    return list(figs)


def serve(
    storage: optuna.storages.BaseStorage, host: str = "127.0.0.1", port: int = 8080, artifacts: str | Path | None = None
) -> None:
    """Run optuna-dashboard on the storage (RDB or journal) until interrupted; localhost by default.

    With `artifacts` (the folder `nkat-search report --artifacts` wrote to) the dashboard lists
    and serves the study's artifacts, the retrained weights among them.
    """
    from optuna.artifacts import FileSystemArtifactStore

    store = None
    if artifacts is not None:
        folder = Path(artifacts).resolve()
        if not folder.is_dir():
            log.warning(
                "artifact folder %s does not exist yet; the dashboard opens artifacts once "
                "`nkat-search report --artifacts %s` has written there",
                folder,
                artifacts,
            )
        store = FileSystemArtifactStore(base_path=str(folder))
        log.info("artifacts from %s", folder)
    log.info("optuna-dashboard on http://%s:%d/dashboard", host, port)
    optuna_dashboard.run_server(storage, host=host, port=port, artifact_store=store)
