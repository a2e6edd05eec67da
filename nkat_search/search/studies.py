"""A study's lifecycle in a storage: create or resume it from a study file, warm-start it from
another study, attach to it by name."""

from __future__ import annotations

import warnings

import optuna
from optuna.trial import TrialState

from ..config import UsageError
from ..metrics import METRIC_NAMES
from ..storage.backends import open_storage
from ..storage.lock import budget_lock
from ..storage.urls import NoStudies, mask
from .kinds import pruner, sampler
from .study_file import StudyConfig, check_warm_start


def create_or_resume(
    storage, url: str, study: StudyConfig, budget: int, warm_start_from: str | None = None
) -> optuna.Study:
    """Create the study, or resume it when it holds the same definition; record the budget;
    enqueue the study file's configurations (once); add an earlier study's finished trials to the
    sampler's history (warm start; they do not count against the budget)."""
    definition = study.definition()
    with budget_lock(url, study.name):
        existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
        warm = _warm_start_trials(storage, url, study, warm_start_from, existing) if warm_start_from else []
        if study.name in existing:
            stored = existing[study.name].user_attrs.get("definition")
            if stored != definition:
                changed = _changed_keys(stored or {}, definition)
                raise UsageError(
                    f"study {study.name!r} already exists in {mask(url)} with a different definition "
                    f"({', '.join(changed)} differ); rename the study in {study.path} or use the file it was made from."
                )
        handle = optuna.create_study(
            storage=storage,
            study_name=study.name,
            direction="maximize",
            sampler=sampler(study),
            pruner=pruner(study),
            load_if_exists=True,
        )
        with warnings.catch_warnings():  # experimental since Optuna 3.2, and the dashboard reads it
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            handle.set_metric_names(METRIC_NAMES)
        handle.set_user_attr("definition", definition)
        handle.set_user_attr("budget", budget)
        handle.set_user_attr("direction", "maximize")
        handle.set_user_attr("gate", {"dataset": study.stage1_dataset, "metric": "local_tpe", "threshold": study.gate})
        for params in study.enqueue:
            handle.enqueue_trial(params, user_attrs={"enqueued": True}, skip_if_exists=True)
        if warm and warm_start_from:  # warm is empty without a source study
            copied = {t.user_attrs.get("warm_start_trial") for t in handle.get_trials(deepcopy=False)}
            handle.add_trials(
                [_warm_copy(t, warm_start_from) for t in warm if f"{warm_start_from}#{t.number}" not in copied]
            )
    return handle


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted keys at which two study definitions differ (space.lr, stage1.epochs)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and prefix.count(".") < 1:
            out += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def check_warm_start_source(url: str, study: StudyConfig, name: str) -> None:
    """--warm-start-from names another study that the storage holds: checked before `start` creates
    the storage or the study, so that a mistake there writes nothing."""
    try:
        names = optuna.get_all_study_names(open_storage(url, create=False))
    except NoStudies:
        names = []
    _check_source(url, study, name, names)


def _check_source(url: str, study: StudyConfig, name: str, names) -> None:
    if name == study.name:
        raise UsageError("--warm-start-from names the study itself; name an earlier study in the same storage.")
    if name not in names:
        listed = ", ".join(n for n in names if n != study.name) or "none"
        raise UsageError(
            f"--warm-start-from {name!r}: no such study in {mask(url)} (it holds: {listed}); name one of those."
        )


def _warm_start_trials(storage, url: str, study: StudyConfig, name: str, existing: dict) -> list:
    _check_source(url, study, name, existing)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(states=(TrialState.COMPLETE,))
    if not trials:
        raise UsageError(f"--warm-start-from {name!r}: that study has no completed trials to learn from.")
    check_warm_start(study, trials)
    return trials


def _warm_copy(trial: optuna.trial.FrozenTrial, source: str) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        state=TrialState.COMPLETE,
        value=trial.value,
        params=trial.params,
        distributions=trial.distributions,
        intermediate_values=trial.intermediate_values,
        user_attrs={**trial.user_attrs, "warm_start_trial": f"{source}#{trial.number}"},
    )


def is_warm_start(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial copied from an earlier study for the sampler's history (not run, not budgeted)."""
    return "warm_start_trial" in trial.user_attrs


def attach(storage, url: str, name: str | None) -> tuple[optuna.Study, StudyConfig]:
    """Load an existing study and its definition; a missing study is a UsageError."""
    summaries = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    names = list(summaries)
    if name is None:
        if len(names) != 1:
            listed = ", ".join(names) or "none"
            raise UsageError(
                f"the storage {mask(url)} holds {len(names)} studies ({listed}); pass --study NAME "
                "or set NKAT_SEARCH_STUDY."
            )
        name = names[0]
    if name not in names:
        raise UsageError(
            f"study {name!r} does not exist in {mask(url)}; create it with "
            "`nkat-search start --study <name or file>` first."
        )
    attrs = summaries[name].user_attrs
    definition = attrs.get("definition")
    if definition is None:
        raise UsageError(
            f"study {name!r} in {mask(url)} was not made by nkat-search start (it has no definition); "
            "create it with `nkat-search start`."
        )
    try:
        config = StudyConfig.from_definition(definition, trials=int(attrs.get("budget", 1)))
    except UsageError as exc:
        raise UsageError(
            f"study {name!r} in {mask(url)} was made by another version of nkat-search and cannot be "
            f"read ({exc}); run it with that version or start a new study."
        ) from None
    handle = optuna.load_study(study_name=name, storage=storage, sampler=sampler(config), pruner=pruner(config))
    return handle, config
