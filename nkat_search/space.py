"""A study's space, sampler and pruner as Optuna objects."""

from __future__ import annotations

import hashlib

import optuna

from .config import (HyperbandPrunerConfig, MedianPrunerConfig, NopPrunerConfig, PercentilePrunerConfig,
                     RandomSamplerConfig, SuccessiveHalvingPrunerConfig)
from .study import StudyConfig


def trial_seed(study_seed: int, trial_index: int) -> int:
    """The sampler seed of the n-th trial of a seeded study: distinct per trial, the same in every run."""
    digest = hashlib.sha256(f"{study_seed}:{trial_index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def sampler(study: StudyConfig, trial_index: int | None = None) -> optuna.samplers.BaseSampler:
    """The study's sampler; with trial_index, seeded for that trial.

    Every worker process builds its own sampler, so a fixed seed would make N workers draw the
    same start-up points. Seeding per trial index (the number of trials the study holds when the
    worker asks, under the budget lock) gives each trial its own stream: distinct across workers,
    and a one-worker study with a seed reproduces."""
    s = study.sampler
    seed = s.seed if s.seed is None or trial_index is None else trial_seed(s.seed, trial_index)
    if isinstance(s, RandomSamplerConfig):
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=s.multivariate, constant_liar=s.constant_liar,
                                      n_startup_trials=s.n_startup_trials)


def pruner(study: StudyConfig) -> optuna.pruners.BasePruner:
    """The learning-curve pruner over Stage 1's per-epoch Local TPE."""
    p = study.pruner
    if isinstance(p, NopPrunerConfig):
        return optuna.pruners.NopPruner()
    if isinstance(p, MedianPrunerConfig):
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if isinstance(p, PercentilePrunerConfig):
        return optuna.pruners.PercentilePruner(p.percentile, n_startup_trials=p.n_startup_trials,
                                               n_warmup_steps=p.n_warmup_steps)
    if isinstance(p, HyperbandPrunerConfig):
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, max_resource=study.stage1_epochs,
                                              reduction_factor=p.reduction_factor)
    if isinstance(p, SuccessiveHalvingPrunerConfig):
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_resource, reduction_factor=p.reduction_factor,
                                                      min_early_stopping_rate=p.min_early_stopping_rate)
    raise TypeError(f"no Optuna pruner for {p!r}")


def suggest(trial: optuna.Trial, study: StudyConfig) -> dict:
    """The trial's parameters, sampled from the study's space."""
    params = {}
    for p in study.space:
        if p.type == "categorical":
            params[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.type == "int":
            params[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            params[p.name] = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
    return params
