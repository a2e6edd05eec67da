"""The sampler and pruner kinds a study file may name: their settings as dataclasses, and the Optuna
objects built from them."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import optuna

from ..config import MAX_SAMPLER_SEED, UsageError, check_types

if TYPE_CHECKING:  # study_file builds these kinds from its tables
    from .study_file import StudyConfig


def check_sampler_seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed <= MAX_SAMPLER_SEED:
        raise UsageError(
            f"seed must be in 0..{MAX_SAMPLER_SEED} (Optuna's samplers take 32 bits) or absent, got {seed}."
        )


@dataclass(frozen=True)
class TPESamplerConfig:
    """Multivariate TPE with a constant liar, so parallel workers spread out."""

    KIND: ClassVar[str] = "tpe"
    seed: int | None = None
    multivariate: bool = True
    constant_liar: bool = True
    n_startup_trials: int = 10
    # Candidates drawn from the good trials' density per suggestion, of which the one with the best
    # ratio of good to bad density is taken (Optuna's default 24). Fewer: less greedy, the
    # suggestions spread over more of the good region instead of piling onto its densest point.
    n_ei_candidates: int = 24

    def __post_init__(self) -> None:
        check_types(self)
        check_sampler_seed(self.seed)
        if self.n_startup_trials < 0:
            raise UsageError(f"n_startup_trials must be >= 0, got {self.n_startup_trials}.")
        if self.n_ei_candidates < 1:
            raise UsageError(f"n_ei_candidates must be >= 1, got {self.n_ei_candidates}.")


@dataclass(frozen=True)
class RandomSamplerConfig:
    KIND: ClassVar[str] = "random"
    seed: int | None = None

    def __post_init__(self) -> None:
        check_types(self)
        check_sampler_seed(self.seed)


@dataclass(frozen=True)
class NopPrunerConfig:
    KIND: ClassVar[str] = "none"


@dataclass(frozen=True)
class MedianPrunerConfig:
    KIND: ClassVar[str] = "median"
    n_startup_trials: int = 5
    n_warmup_steps: int = 1

    def __post_init__(self) -> None:
        check_types(self)
        if self.n_startup_trials < 0 or self.n_warmup_steps < 0:
            raise UsageError("n_startup_trials and n_warmup_steps must be >= 0.")


@dataclass(frozen=True)
class PercentilePrunerConfig:
    KIND: ClassVar[str] = "percentile"
    percentile: float = 25.0
    n_startup_trials: int = 5
    n_warmup_steps: int = 1

    def __post_init__(self) -> None:
        check_types(self)
        if not 0 < self.percentile < 100:
            raise UsageError(f"percentile must be in (0, 100), got {self.percentile}.")
        if self.n_startup_trials < 0 or self.n_warmup_steps < 0:
            raise UsageError("n_startup_trials and n_warmup_steps must be >= 0.")


@dataclass(frozen=True)
class HyperbandPrunerConfig:
    """Hyperband over Stage 1's epochs (max_resource is the study's stage1.epochs)."""

    KIND: ClassVar[str] = "hyperband"
    min_resource: int = 1
    reduction_factor: int = 3

    def __post_init__(self) -> None:
        check_types(self)
        if self.min_resource < 1 or self.reduction_factor < 2:
            raise UsageError("min_resource must be >= 1 and reduction_factor >= 2.")


@dataclass(frozen=True)
class SuccessiveHalvingPrunerConfig:
    KIND: ClassVar[str] = "successive_halving"
    min_resource: int = 1
    reduction_factor: int = 3
    min_early_stopping_rate: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        if self.min_resource < 1 or self.reduction_factor < 2 or self.min_early_stopping_rate < 0:
            raise UsageError("min_resource must be >= 1, reduction_factor >= 2 and min_early_stopping_rate >= 0.")


SAMPLERS = {c.KIND: c for c in (TPESamplerConfig, RandomSamplerConfig)}


PRUNERS = {
    c.KIND: c
    for c in (
        NopPrunerConfig,
        MedianPrunerConfig,
        PercentilePrunerConfig,
        HyperbandPrunerConfig,
        SuccessiveHalvingPrunerConfig,
    )
}


SamplerConfig = TPESamplerConfig | RandomSamplerConfig


PrunerConfig = (
    NopPrunerConfig
    | MedianPrunerConfig
    | PercentilePrunerConfig
    | HyperbandPrunerConfig
    | SuccessiveHalvingPrunerConfig
)


def kind_dict(cfg) -> dict:
    """A sampler or pruner config as its study-file table: kind first, then its keys."""
    return {"kind": cfg.KIND, **dataclasses.asdict(cfg)}


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
    return optuna.samplers.TPESampler(
        seed=seed,
        multivariate=s.multivariate,
        constant_liar=s.constant_liar,
        n_startup_trials=s.n_startup_trials,
        n_ei_candidates=s.n_ei_candidates,
    )


def pruner(study: StudyConfig) -> optuna.pruners.BasePruner:
    """The learning-curve pruner over Stage 1's per-epoch Local TPE."""
    p = study.pruner
    if isinstance(p, NopPrunerConfig):
        return optuna.pruners.NopPruner()
    if isinstance(p, MedianPrunerConfig):
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if isinstance(p, PercentilePrunerConfig):
        return optuna.pruners.PercentilePruner(
            p.percentile, n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps
        )
    if isinstance(p, HyperbandPrunerConfig):
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_resource, max_resource=study.stage1_epochs, reduction_factor=p.reduction_factor
        )
    if isinstance(p, SuccessiveHalvingPrunerConfig):
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=p.min_resource,
            reduction_factor=p.reduction_factor,
            min_early_stopping_rate=p.min_early_stopping_rate,
        )
    raise TypeError(f"no Optuna pruner for {p!r}")
