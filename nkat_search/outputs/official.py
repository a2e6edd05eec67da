"""The official Stage-2 result (docs/research.md, "Round 2 ... Then the best configuration is retrained
for the full budget and the Stage-2 metrics above are recomputed as the official result").

The best completed trials are retrained with the study's report budget on every dataset of the
study and evaluated once on the TEST split; Global TPE, Consistency and Robustness are computed
from those test accuracies with nkat_search.metrics. Each finished dataset is written to the
output folder at once (state.json + safetensors weights), so an interrupted report resumes where
it stopped. The weights are also uploaded to an Optuna artifact store (outputs/weights.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import sys
import time
import typing
from collections.abc import Callable
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.trial import FrozenTrial, TrialState

from ..config import UsageError
from ..data.loader import load_splits
from ..metrics import consistency, global_tpe, local_tpe, robustness
from ..search.study_file import StudyConfig
from ..train import fit
from .report_md import format_markdown
from .tables import datasets_of
from .weights import save_weights, sha256

log = logging.getLogger("nkat_search")


# docs/research.md, "Where the research stood": the Stage-2 targets.
STAGE2_TARGETS = {"global_tpe": 0.70, "consistency": 0.80, "robustness": 0.75}


# docs/research.md, "Per-dataset targets for the next round": (accuracy, Local TPE).
DATASET_TARGETS = {
    "mnist": (0.91, 0.69),
    "fashion_mnist": (0.87, 0.67),
    "emnist_letters": (0.75, 0.60),
    "cifar10": (0.60, 0.45),
}


# Study user attribute that maps a retrained trial to its weights: {dataset: {"artifact_id", ...}}.
WEIGHTS_ATTR = "report:trial-{number}"


STATE_VERSION = 1


def best_trials(study: optuna.Study, top: int) -> list[FrozenTrial]:
    """The best `top` completed trials by Global TPE (the search's validation value)."""
    if top < 1:
        raise UsageError(f"--top must be at least 1, got {top}.")
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not done:
        raise UsageError(
            f"study {study.study_name!r} has no completed trials yet; run `nkat-search worker` "
            "until at least one trial completes, then report."
        )
    done.sort(key=lambda t: typing.cast(float, t.value), reverse=True)  # cast: a COMPLETE trial has a value
    return done[:top]


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def _shortfall(value: float, target: float) -> dict:
    return {
        "value": value,
        "target": target,
        "ok": value >= target,
        "short_by": None if value >= target else target - value,
    }


def retrain_trial(
    study: optuna.Study,
    config: StudyConfig,
    trial: FrozenTrial,
    *,
    epochs: int,
    warmup: int,
    out: Path,
    device: torch.device,
    artifacts: Path,
    say: Callable[[str], None] = log.info,
) -> dict:
    """Retrain one trial on every dataset (reusing finished ones from out/state.json) and score it on test."""
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.json"
    state = _resumed(state_path, _state_key(study, config, trial, epochs, warmup), trial.number, say)
    store_path = str(Path(artifacts).resolve())
    artifact_store = FileSystemArtifactStore(base_path=store_path)
    weights_attr = WEIGHTS_ATTR.format(number=trial.number)

    for dataset in datasets_of(config):
        done = state["datasets"].get(dataset)
        weights = out / f"trial-{trial.number}-{dataset}.safetensors"
        if weights.is_file() and done is not None and sha256(weights) == done["sha256"]:
            say(f"trial {trial.number} {dataset}: reused from {state_path}")
            done["reused"] = True
        else:
            done = _retrain_on(config, trial, dataset, epochs, warmup, device, weights, say)
        if done.get("artifact_store") != store_path:
            # Optuna refuses new attributes on a finished trial in every storage, so the weights are
            # artifacts of the study; the study attribute WEIGHTS_ATTR maps trial and dataset to them.
            done["artifact_id"] = upload_artifact(
                artifact_store=artifact_store, file_path=str(weights), study_or_trial=study
            )
            done["artifact_store"] = store_path
        state["datasets"][dataset] = done
        _write_json(state_path, state)

    results = [state["datasets"][d] for d in datasets_of(config)]
    study.set_user_attr(weights_attr, _weights_index(results, epochs))
    accuracies = [r["test_accuracy"] for r in results]
    params = [r["params"] for r in results]
    tpes = [local_tpe(a, p) for a, p in zip(accuracies, params)]
    measured = {
        "global_tpe": global_tpe(accuracies, params),
        "consistency": consistency(tpes),
        "robustness": robustness(tpes),
    }
    rows = [_dataset_row(r, tpe, out) for r, tpe in zip(results, tpes)]
    return {
        "trial": trial.number,
        "search_global_tpe": trial.value,
        "params": trial.params,
        "seeds": {"train": trial.params.get("seed", config.train.seed), "split": config.data.split_seed},
        "stage2": {m: _shortfall(v, STAGE2_TARGETS[m]) for m, v in measured.items()},
        "datasets": rows,
        "state": str(state_path),
        "weights_attr": weights_attr,
    }


def _state_key(study: optuna.Study, config: StudyConfig, trial: FrozenTrial, epochs: int, warmup: int) -> dict:
    """What out/state.json's results depend on: a state with another key is not resumed."""
    return {
        "version": STATE_VERSION,
        "study": study.study_name,
        "trial": trial.number,
        "params": trial.params,
        "epochs": epochs,
        "warmup": warmup,
        "data": dataclasses.asdict(config.data),
        "seed": trial.params.get("seed", config.train.seed),
    }


def _weights_index(results: list[dict], epochs: int) -> dict:
    """The study attribute WEIGHTS_ATTR of one trial: its artifact and test accuracy per dataset."""
    return {
        r["dataset"]: {
            "artifact_id": r["artifact_id"],
            "file": r["weights"],
            "epochs": epochs,
            "test_accuracy": r["test_accuracy"],
        }
        for r in results
    }


def _retrain_on(config, trial, dataset: str, epochs: int, warmup: int, device, weights: Path, say) -> dict:
    """Train the trial's configuration on one dataset, score it on TEST and write its weights."""
    model_cfg, train_cfg = config.configs_for(trial.params, dataset, epochs)
    train_cfg = dataclasses.replace(train_cfg, warmup=warmup)
    say(f"trial {trial.number} {dataset}: training {epochs} epochs on {device}")
    result = fit(model_cfg, train_cfg, load_splits(dataset, config.data, device), eval_test=True)
    assert result.model is not None  # fit() returns the model it trained
    done = {
        **result.summary(),
        "weights": weights.name,
        "sha256": save_weights(result.model, model_cfg, weights),
        "model_config": dataclasses.asdict(model_cfg),
        "train_config": dataclasses.asdict(train_cfg),
        "reused": False,
    }
    say(
        f"trial {trial.number} {dataset}: test accuracy {done['test_accuracy']:.4f} "
        f"(validation {done['accuracy']:.4f}) in {done['seconds']:.1f} s"
    )
    return done


def _resumed(state_path: Path, key: dict, number: int, say: Callable[[str], None]) -> dict:
    """The state of an earlier run of the same retraining (same key), else a fresh one."""
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if state is None or state.get("key") != key:
        if state is not None:
            say(
                f"trial {number}: {state_path} belongs to another run (trial, parameters, epochs or data "
                "differ); starting over"
            )
        state = {"key": key, "datasets": {}}
    return state


def _dataset_row(r: dict, tpe: float, out: Path) -> dict:
    """One dataset's row of the report: test scores against the research's targets, and provenance."""
    acc_target, tpe_target = DATASET_TARGETS.get(r["dataset"], (None, None))
    return {
        "dataset": r["dataset"],
        "test_accuracy": r["test_accuracy"],
        "val_accuracy": r["accuracy"],
        "local_tpe": tpe,
        "params": r["params"],
        "lambda": r["lambda"],
        "accuracy_target": _shortfall(r["test_accuracy"], acc_target) if acc_target is not None else None,
        "tpe_target": _shortfall(tpe, tpe_target) if tpe_target is not None else None,
        "epochs": r["epochs"],
        "seconds": r["seconds"],
        "precision": r["precision"],
        "device": r["device"],
        "weights": str(out / r["weights"]),
        "sha256": r["sha256"],
        "artifact_id": r["artifact_id"],
        "artifact_store": r["artifact_store"],
        "reused": r["reused"],
        "model_config": r["model_config"],
        "train_config": r["train_config"],
    }


def software() -> dict:
    """Versions of what decides the numbers: Python, torch, optuna, safetensors, nkat-search."""
    import safetensors

    try:
        ours = version("nkat-search")
    except PackageNotFoundError:  # run from a source tree that is not installed
        ours = "source tree"
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "safetensors": safetensors.__version__,
        "nkat-search": ours,
        "platform": platform.platform(),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def build_report(
    study: optuna.Study,
    config: StudyConfig,
    *,
    top: int = 1,
    epochs: int | None = None,
    out: str | Path,
    device: torch.device,
    artifacts: str | Path,
    storage_url: str = "",
    say: Callable[[str], None] = log.info,
) -> dict:
    """Retrain the best `top` trials, score them on test, write report.json and report.md to out."""
    if epochs is not None and epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {epochs}.")
    started = time.perf_counter()
    trials = best_trials(study, top)
    budget_epochs = epochs if epochs is not None else config.report_epochs
    # The study's warm-up is meant for its report budget; a shorter --epochs keeps at least one
    # epoch of cosine decay. The value used is recorded in the report.
    warmup = min(config.report_warmup, max(0, budget_epochs - 1))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    Path(artifacts).mkdir(parents=True, exist_ok=True)
    results = [
        retrain_trial(
            study,
            config,
            t,
            epochs=budget_epochs,
            warmup=warmup,
            out=out / f"trial-{t.number}",
            device=device,
            artifacts=Path(artifacts),
            say=say,
        )
        for t in trials
    ]
    report = {
        **_provenance(study, storage_url, device, Path(artifacts)),
        "split": "test",
        "datasets": datasets_of(config),
        "data": dataclasses.asdict(config.data),
        "budget": {
            "epochs": budget_epochs,
            "warmup": warmup,
            "source": "--epochs" if epochs is not None else "study report.epochs",
            "study_report_epochs": config.report_epochs,
            "study_report_warmup": config.report_warmup,
        },
        "top_requested": top,
        "targets": _targets(),
        "trials": results,
        "wall_seconds": time.perf_counter() - started,
    }
    _write_json(out / "report.json", report)
    (out / "report.md").write_text(format_markdown(report))
    return report


def _provenance(study: optuna.Study, storage_url: str, device: torch.device, artifacts: Path) -> dict:
    """Where the report comes from: the study, its storage (password masked), when, on what."""
    from ..storage.urls import mask

    return {
        "study": study.study_name,
        "storage": mask(storage_url) if storage_url else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "software": software(),
        "artifact_store": str(artifacts.resolve()),
    }


def _targets() -> dict:
    """The research's targets the report is judged against (docs/research.md)."""
    return {
        "stage2": STAGE2_TARGETS,
        "datasets": {d: {"accuracy": a, "local_tpe": t} for d, (a, t) in DATASET_TARGETS.items()},
    }
