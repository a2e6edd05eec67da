"""A study's space as Optuna distributions: the parameters of a trial."""

from __future__ import annotations

import optuna

from .study_file import StudyConfig


def suggest(trial: optuna.Trial, study: StudyConfig) -> dict:
    """The trial's parameters, sampled from the study's space."""
    params = {}
    for p in study.space:
        if p.type == "categorical":
            params[p.name] = trial.suggest_categorical(p.name, list(p.choices))
            continue
        assert p.low is not None and p.high is not None  # study_tables._param_spec sets both for int and float
        if p.type == "int":
            params[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            params[p.name] = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
    return params
