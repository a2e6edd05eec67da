"""Study space -> Optuna suggestions, sampler and pruner; trial parameters -> ModelConfig/TrainConfig."""

from __future__ import annotations

import dataclasses

import optuna

from .config import ModelConfig, StudyConfig, TrainConfig, adapt_patch_size, field_names


def sampler(study: StudyConfig) -> optuna.samplers.BaseSampler:
    """TPE (multivariate, constant liar so parallel workers do not sample the same point) or random."""
    s = study.sampler
    if s["kind"] == "random":
        return optuna.samplers.RandomSampler(seed=s["seed"])
    return optuna.samplers.TPESampler(
        seed=s["seed"], multivariate=s["multivariate"], constant_liar=s["constant_liar"],
        n_startup_trials=s["n_startup_trials"],
    )


def pruner(study: StudyConfig) -> optuna.pruners.BasePruner:
    """The learning-curve pruner over Stage 1's per-epoch Local TPE."""
    p = dict(study.pruner)
    kind = p.pop("kind")
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "median":
        return optuna.pruners.MedianPruner(**p)
    if kind == "percentile":
        return optuna.pruners.PercentilePruner(**p)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(max_resource=study.stage1_epochs, **p)
    return optuna.pruners.SuccessiveHalvingPruner(**p)


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


def configs_for(params: dict, study: StudyConfig, spec, epochs: int) -> tuple[ModelConfig, TrainConfig]:
    """The model and recipe of a trial on one dataset: fixed settings, then the searched ones.

    The dataset decides channels, image size and classes; the patch size is adapted to 28x28
    images by config.adapt_patch_size.
    """
    model_keys, train_keys = field_names(ModelConfig), field_names(TrainConfig)
    model_kwargs = {**study.model, **{k: v for k, v in params.items() if k in model_keys}}
    model_kwargs.update(in_chans=spec.channels, img_size=spec.image_size, num_classes=spec.num_classes)
    patch = model_kwargs.get("patch_size", ModelConfig.patch_size)
    stem = model_kwargs.get("conv_stem", ModelConfig.conv_stem)
    model_kwargs["patch_size"] = adapt_patch_size(spec.image_size, stem, patch)
    model_cfg = ModelConfig(**model_kwargs)
    train_cfg = dataclasses.replace(study.train, epochs=epochs, **{k: v for k, v in params.items() if k in train_keys})
    return model_cfg, train_cfg
