"""The two-stage objective (docs/research.md, "Round 2"): thin glue over space, data, train and metrics.

Stage 1 trains on the gate dataset (CIFAR-10) and reports the Local TPE after every epoch, so
Optuna's pruner can stop a poor learning curve; at the end, a Local TPE below the study's gate
prunes the trial (the gate judges before the pruner after the last epoch, so its decisions are
recorded as its own; a pruner may still stop a trial that passed the gate before Stage 2). Stage 2
trains the survivors on the other datasets; the trial's value is the Global TPE over all of them.
Everything recorded on the trial is measured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import optuna
import torch

from ..data.loader import Splits
from ..metrics import consistency, global_tpe, robustness
from ..outputs.progress import Relay, StudyProgress
from ..train import EpochCallback, FitResult, NonFiniteLossError, Timings, fit
from .space import suggest
from .study_file import StudyConfig

log = logging.getLogger("nkat_search")


def check_gate(local_tpe: float, gate: float, epoch: int, trial: optuna.Trial) -> None:
    """Prune (Optuna's PRUNED state) when the Stage-1 Local TPE is below the gate; record why."""
    if local_tpe < gate:
        reason = f"gate: local TPE {local_tpe:.4f} < {gate} after epoch {epoch}"
        trial.set_user_attr("prune_reason", reason)
        trial.set_user_attr("pruned_at_epoch", epoch)
        raise optuna.TrialPruned(reason)


def record(trial: optuna.Trial, result: FitResult) -> None:
    """Per-dataset attributes: accuracy, params, lambda, local TPE, seconds, epochs."""
    d = result.dataset
    for key, value in (
        ("accuracy", result.accuracy),
        ("params", result.params),
        ("lambda", result.lambda_),
        ("local_tpe", result.local_tpe),
        ("seconds", result.seconds),
        ("epochs", result.epochs),
    ):
        trial.set_user_attr(f"{d}_{key}", value)


def ask_pruner(local_tpe: float, kind: str, epoch: int, trial: optuna.Trial) -> None:
    """Prune when the study's pruner (of `kind`) says so after this Stage-1 epoch; record why."""
    if trial.should_prune():
        reason = f"pruner ({kind}): local TPE {local_tpe:.4f} at epoch {epoch}"
        trial.set_user_attr("prune_reason", reason)
        trial.set_user_attr("pruned_at_epoch", epoch)
        raise optuna.TrialPruned(reason)


# train(trial, params, dataset, epochs, on_epoch): the trial's configuration trained on a dataset.
Train = Callable[[optuna.Trial, dict, str, int, EpochCallback | None], FitResult]


def make_objective(
    study: StudyConfig,
    load: Callable[[str], Splits],
    progress: StudyProgress | Relay | None = None,
    timer: Timings | None = None,
) -> Callable[[optuna.Trial], float]:
    """The objective for study.optimize / ask-tell; load(name) gives a dataset's splits (cached);
    progress (the worker's display) hears of every trial, stage and epoch; timer (the bench's)
    is charged by fit's phases."""
    shown: StudyProgress | Relay | _Quiet = progress or _Quiet()

    def train(
        trial: optuna.Trial, params: dict, dataset: str, epochs: int, on_epoch: EpochCallback | None
    ) -> FitResult:
        model_cfg, train_cfg = study.configs_for(params, dataset, epochs)
        trial.set_user_attr(f"{dataset}_patch_size", model_cfg.patch_size)
        try:
            return fit(model_cfg, train_cfg, load(dataset), on_epoch=on_epoch, timer=timer)
        except NonFiniteLossError as exc:
            # A diverging configuration is a property of the point, not a fault of the worker:
            # PRUNED (kept out of the ranking, no retry), with the reason on the trial.
            trial.set_user_attr("prune_reason", f"non-finite loss: {exc}")
            raise optuna.TrialPruned(str(exc)) from None

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, study)
        # The thread count decides the CPU kernels' reduction order, so it is part of what makes a
        # trial's numbers repeat (benchmarks/demo_seeds.py checks it).
        trial.set_user_attr("torch_threads", torch.get_num_threads())
        shown.trial_started(trial.number, params)
        results = [stage1(trial, params, study, train, shown)]
        results += stage2(trial, params, study, train, shown)
        tpes = [r.local_tpe for r in results]
        value = global_tpe([r.accuracy for r in results], [r.params for r in results])
        trial.set_user_attr("global_tpe", value)
        trial.set_user_attr("consistency", consistency(tpes))
        trial.set_user_attr("robustness", robustness(tpes))
        return value

    return objective


def stage1(
    trial: optuna.Trial, params: dict, study: StudyConfig, train: Train, shown: StudyProgress | Relay | _Quiet
) -> FitResult:
    """Stage 1 on the gate dataset: the pruner is asked after every epoch, after the gate at the last."""
    dataset, epochs = study.stage1_dataset, study.stage1_epochs
    started = time.perf_counter()
    shown.stage(trial.number, 1, dataset, epochs)

    def on_epoch(epoch: int, accuracy: float, tpe: float) -> None:
        trial.report(tpe, epoch)
        shown.epoch(trial.number, epoch, epochs, accuracy, tpe)
        if epoch < epochs:
            ask_pruner(tpe, study.pruner.KIND, epoch, trial)

    try:
        result = train(trial, params, dataset, epochs, on_epoch)
    finally:
        trial.set_user_attr("stage1_seconds", time.perf_counter() - started)
    record(trial, result)
    # After the last Stage-1 epoch the gate judges first (a trial below it is the gate's, whatever
    # a pruner would say); one that passes may still be stopped by the pruner before Stage 2.
    check_gate(result.local_tpe, study.gate, result.epochs, trial)
    ask_pruner(result.local_tpe, study.pruner.KIND, result.epochs, trial)
    return result


def stage2(
    trial: optuna.Trial, params: dict, study: StudyConfig, train: Train, shown: StudyProgress | Relay | _Quiet
) -> list[FitResult]:
    """Stage 2: the survivor trained on each of the other datasets in turn."""
    started = time.perf_counter()
    results = []
    try:
        for dataset in study.stage2_datasets:
            shown.stage(trial.number, 2, dataset, study.stage2_epochs)
            results.append(
                train(
                    trial,
                    params,
                    dataset,
                    study.stage2_epochs,
                    lambda e, a, t: shown.epoch(trial.number, e, study.stage2_epochs, a, t),
                )
            )
            record(trial, results[-1])
    finally:
        trial.set_user_attr("stage2_seconds", time.perf_counter() - started)
    return results


class _Quiet:
    """No display: the objective's progress events go nowhere (tests, the bench)."""

    def trial_started(self, number: int, params: dict) -> None: ...
    def stage(self, number: int, stage: int, dataset: str, epochs: int) -> None: ...
    def epoch(self, number: int, epoch: int, epochs: int, accuracy: float, local_tpe: float) -> None: ...
