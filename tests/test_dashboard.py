"""Dashboard notes, and optuna-dashboard serving a real journal-file study (JSON API, headless Chromium)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import optuna_dashboard
import pytest
from helpers import ROOT
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.storages.journal import (
    JournalFileBackend,
    JournalFileOpenLock,
    JournalStorage,
)
from optuna.trial import TrialState, create_trial

from nkat_search.config import UsageError
from nkat_search.outputs.dashboard import (
    annotate_study,
    annotate_trial,
    study_note,
    trial_note,
)

pytestmark = [pytest.mark.optuna_api]

REPO = ROOT
DATASETS = ["cifar10", "mnist", "fashion_mnist", "emnist_letters"]
DEFINITION = {
    "study": {"name": "dash-study"},
    "space": {
        "patch_size": {"type": "categorical", "choices": [2, 4]},
        "embed_dim": {"type": "int", "low": 64, "high": 256, "step": 32, "log": False},
        "temperature": {"type": "float", "low": 0.5, "high": 2.0, "log": True},
    },
    "sampler": {"kind": "tpe", "seed": 0, "multivariate": True, "constant_liar": True, "n_startup_trials": 5},
    "pruner": {"kind": "median", "n_startup_trials": 3, "n_warmup_steps": 2},
    "stage1": {"dataset": "cifar10", "epochs": 4, "gate": 0.6},
    "stage2": {"datasets": DATASETS[1:], "epochs": 2, "train": {}},
    "data": {"source": "synthetic"},
    "model": {},
    "train": {},
    "report": {"epochs": 4, "warmup": 1},
    "enqueue": [],
}
DISTRIBUTIONS = {
    "patch_size": CategoricalDistribution([2, 4]),
    "embed_dim": IntDistribution(64, 256, step=32),
    "temperature": FloatDistribution(0.5, 2.0, log=True),
}


def dataset_attrs(d: str, accuracy: float) -> dict:
    return {
        f"{d}_accuracy": accuracy,
        f"{d}_params": 1_234_567,
        f"{d}_lambda": 0.25,
        f"{d}_local_tpe": accuracy * 0.9,
        f"{d}_seconds": 12.5,
        f"{d}_epochs": 4,
    }


def make_study(path: Path) -> optuna.Study:
    """A study as nkat-search leaves it: 2 COMPLETE, 1 PRUNED at the gate, 1 FAIL; all annotated."""
    storage = JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    study = optuna.create_study(storage=storage, study_name=DEFINITION["study"]["name"], direction="maximize")
    study.set_metric_names(["global_tpe"])
    study.set_user_attr("definition", DEFINITION)
    study.set_user_attr("budget", 20)
    study.set_user_attr("direction", "maximize")
    study.set_user_attr("gate", {"dataset": "cifar10", "metric": "local_tpe", "threshold": 0.6})
    params = {"patch_size": 4, "embed_dim": 128, "temperature": 1.0}
    for n, value in enumerate((0.71, 0.68)):
        attrs = {k: v for d in DATASETS for k, v in dataset_attrs(d, 0.8 + n / 100).items()}
        attrs.update(
            global_tpe=value,
            consistency=0.9,
            robustness=0.85,
            stage1_seconds=50.0,
            stage2_seconds=80.0,
            worker="host:0",
        )
        study.add_trial(
            create_trial(
                state=TrialState.COMPLETE,
                value=value,
                params=params,
                distributions=DISTRIBUTIONS,
                user_attrs=attrs,
                intermediate_values={1: 0.5, 2: 0.6},
            )
        )
    study.add_trial(
        create_trial(
            state=TrialState.PRUNED,
            params=params,
            distributions=DISTRIBUTIONS,
            intermediate_values={1: 0.3, 2: 0.4},
            user_attrs={
                **dataset_attrs("cifar10", 0.45),
                "prune_reason": "gate: local TPE 0.4050 < 0.6 after epoch 4",
                "pruned_at_epoch": 4,
            },
        )
    )
    study.add_trial(
        create_trial(
            state=TrialState.FAIL,
            params=params,
            distributions=DISTRIBUTIONS,
            user_attrs={"fail_reason": "CUDA out of memory"},
        )
    )
    annotate_study(study)
    for trial in study.get_trials():
        annotate_trial(study, trial)
    return study


def test_study_note_lists_space_gate_budget_and_search() -> None:
    note = study_note(DEFINITION, 20)
    assert note.startswith("## dash-study\n")
    assert "| patch_size | categorical | 2, 4 | - | no |" in note
    assert "| embed_dim | int | [64, 256] | 32 | no |" in note
    assert "| temperature | float | [0.5, 2.0] | - | yes |" in note
    assert "Stage 1: cifar10, 4 epochs; gate: local TPE >= 0.6" in note
    assert "Stage 2: mnist, fashion_mnist, emnist_letters, 2 epochs each" in note
    assert "Trial budget: 20 trials" in note
    assert "Sampler: `tpe` (seed=0, multivariate=True, constant_liar=True, n_startup_trials=5)" in note
    assert "Pruner: `median` (n_startup_trials=3, n_warmup_steps=2)" in note


@pytest.mark.parametrize(
    "state, expected, absent",
    [
        (
            TrialState.COMPLETE,
            [
                "| mnist | 0.8000 | 0.7200 | 1,234,567 | 0.2500 | 12.5000 | 4 |",
                "Global TPE: 0.7100",
                "Consistency: 0.9000",
                "Robustness: 0.8500",
            ],
            "Pruned",
        ),
        (TrialState.PRUNED, ["Pruned (epoch 4): gate: local TPE"], "Global TPE"),
        (TrialState.FAIL, ["Failed: CUDA out of memory"], "Global TPE"),
    ],
)
def test_trial_note_per_state(state: TrialState, expected: list[str], absent: str) -> None:
    attrs = {k: v for d in DATASETS for k, v in dataset_attrs(d, 0.8).items()}
    attrs.update(
        consistency=0.9,
        robustness=0.85,
        prune_reason="gate: local TPE 0.4 < 0.6 after epoch 4",
        pruned_at_epoch=4,
        fail_reason="CUDA out of memory",
    )
    trial = create_trial(state=state, value=0.71 if state == TrialState.COMPLETE else None, user_attrs=attrs)
    note = trial_note(trial, DATASETS)
    assert note.startswith(f"## Trial {trial.number}: {state.name}\n")
    rows = [line.split(" |")[0] for line in note.splitlines() if line.startswith("| ") and "dataset" not in line]
    assert rows == [f"| {d}" for d in DATASETS]  # the study's order
    for text in expected:
        assert text in note
    assert absent not in note


def test_notes_are_rewritten_and_need_a_definition(tmp_path: Path) -> None:
    study = make_study(tmp_path / "study.journal")
    assert optuna_dashboard.get_note(study) == study_note(DEFINITION, 20)
    study.set_user_attr("budget", 30)  # a resume with a bigger budget rewrites the note
    annotate_study(study)
    assert "Trial budget: 30 trials" in optuna_dashboard.get_note(study)
    annotate_trial(study, 2)  # by number
    assert optuna_dashboard.get_note(optuna.Trial(study, study.trials[2]._trial_id)).startswith("## Trial 2: PRUNED")
    with pytest.raises(UsageError, match="no trial 9"):
        annotate_trial(study, 9)
    bare = optuna.create_study(storage=study._storage, study_name="bare")
    with pytest.raises(UsageError, match="not made by nkat-search start"):
        annotate_study(bare)


def get(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(argv: list[str], port: int) -> Iterator[str]:
    """The base URL of the optuna-dashboard that argv starts on port, once it answers; stopped afterwards."""
    proc = subprocess.Popen(
        [sys.executable, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                get(f"{base}/api/meta")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"optuna-dashboard did not answer on {base}: {proc.communicate()[0]}")
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """(base URL, study id) of optuna-dashboard serving a journal-file study, run through serve()."""
    path = tmp_path_factory.mktemp("dashboard") / "study.journal"
    study = make_study(path)
    port = free_port()
    code = (
        "import sys; from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage; "
        "from nkat_search.outputs.dashboard import serve; p = sys.argv[1]; "
        "serve(JournalStorage(JournalFileBackend(p, lock_obj=JournalFileOpenLock(p))), port=int(sys.argv[2]))"
    )
    with running(["-c", code, str(path), str(port)], port) as base:
        yield base, study._study_id


def test_dashboard_serves_the_study_trials_attrs_and_notes(dashboard) -> None:
    base, study_id = dashboard
    summaries = get(f"{base}/api/studies")["study_summaries"]
    assert [(s["study_id"], s["study_name"]) for s in summaries] == [(study_id, "dash-study")]
    detail = get(f"{base}/api/studies/{study_id}")
    assert detail["name"] == "dash-study"
    assert detail["objective_names"] == ["global_tpe"]
    assert {a["key"]: a["value"] for a in detail["user_attrs"]}["budget"] == "20"
    assert "Trial budget: 20 trials" in detail["note"]["body"]
    assert "| embed_dim | int | [64, 256] | 32 | no |" in detail["note"]["body"]
    trials = detail["trials"]
    assert [t["state"] for t in trials] == ["Complete", "Complete", "Pruned", "Fail"]
    assert [t["values"] for t in trials[:2]] == [[0.71], [0.68]]
    attrs = [{a["key"]: a["value"] for a in t["user_attrs"]} for t in trials]
    assert attrs[0]["cifar10_accuracy"] == "0.8" and attrs[1]["emnist_letters_params"] == "1234567"
    assert attrs[2]["prune_reason"].startswith("gate: local TPE 0.4050")
    assert attrs[3]["fail_reason"] == "CUDA out of memory"
    notes = [t["note"]["body"] for t in trials]
    assert "Global TPE: 0.7100" in notes[0] and "| fashion_mnist | 0.8100 |" in notes[1]
    assert "Pruned (epoch 4): gate: local TPE 0.4050 < 0.6 after epoch 4" in notes[2]
    assert "Failed: CUDA out of memory" in notes[3]
    assert [b["number"] for b in detail["best_trials"]] == [0]


# Stands in for the safetensors weights `nkat-search report` uploads: 16 KiB of every byte value.
WEIGHTS = bytes(range(256)) * 64


def test_dashboard_started_by_the_cli_serves_the_artifacts_in_its_artifact_store(tmp_path: Path) -> None:
    path, folder, weights = tmp_path / "study.journal", tmp_path / "artifacts", tmp_path / "weights.safetensors"
    folder.mkdir()
    weights.write_bytes(WEIGHTS)
    store = FileSystemArtifactStore(str(folder))
    storage = JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    study = optuna.create_study(storage=storage, study_name="artifact-study", direction="maximize")
    trial = study.ask()
    on_trial = upload_artifact(artifact_store=store, file_path=str(weights), study_or_trial=trial)
    study.tell(trial, 0.5)
    # `nkat-search report` uploads onto the study: a finished trial takes no new attributes.
    on_study = upload_artifact(artifact_store=store, file_path=str(weights), study_or_trial=study)

    port = free_port()
    argv = [
        "-m",
        "nkat_search.cli",
        "dashboard",
        "--storage",
        f"journal:{path}",
        "--port",
        str(port),
        "--artifacts",
        str(folder),
    ]
    with running(argv, port) as base:
        detail = get(f"{base}/api/studies/{study._study_id}")
        assert [a["artifact_id"] for a in detail["artifacts"]] == [on_study]
        (listed,) = detail["trials"][0]["artifacts"]
        assert (listed["artifact_id"], listed["filename"]) == (on_trial, "weights.safetensors")
        # optuna-dashboard's download routes; without an artifact store they answer 400
        trial_id = detail["trials"][0]["trial_id"]
        for url in (
            f"{base}/artifacts/{study._study_id}/{trial_id}/{on_trial}",
            f"{base}/artifacts/{study._study_id}/{on_study}",
        ):
            with urllib.request.urlopen(url, timeout=5) as response:
                assert response.read() == WEIGHTS, url


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CI"):
        pytest.fail("headless Chromium is missing; install it with `apt-get install -y chromium chromium-driver`.")
    pytest.skip("headless Chromium is missing (apt-get install -y chromium chromium-driver)")


@pytest.mark.browser
def test_dashboard_page_renders_the_study_in_chromium(dashboard, tmp_path: Path) -> None:
    base, study_id = dashboard
    url = f"{base}/dashboard/studies/{study_id}"
    flags = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,1000",
        "--virtual-time-budget=10000",
    ]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=60).stdout
    # The single-page app fetched the study over the API and rendered its name and trials.
    assert f"dash-study (id={study_id})" in dom
    assert "Params = [patch_size: 4, embed_dim: 128, temperature: 1.0]" in dom  # the best trial's card
    assert 'data-unformatted="Pruned"' in dom  # the timeline plot's legend, drawn from the trials
    shot = tmp_path / "dashboard.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=60, check=True)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # a blank 1400x1000 page compresses to a few KB
