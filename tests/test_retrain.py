"""The official Stage-2 report on a tiny real study: tables, metrics, resumption, weights as artifacts."""

import argparse
import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
from optuna.artifacts import FileSystemArtifactStore

from nkat_search import metrics, train
from nkat_search.cli import commands, main
from nkat_search.config import TrainConfig, UsageError
from nkat_search.data.loader import load_splits
from nkat_search.outputs import official as retrain
from nkat_search.outputs.tables import datasets_of
from nkat_search.search import studies, worker
from nkat_search.search.study_file import load_study
from nkat_search.storage import backends

# smoke.toml shrunk to seconds: tiny models, 300 synthetic images, no pruner, a gate every trial passes.
TINY_STUDY = """
[study]
name = "nkat-tiny"
trials = 2
[sampler]
kind = "random"
seed = 5  # two trials that differ in both embed_dim and depth (for the contour plot)
[pruner]
kind = "none"
[stage1]
dataset = "cifar10"
epochs = 2
gate = 0.001
[stage2]
datasets = ["mnist", "fashion_mnist", "emnist_letters"]
epochs = 1
[data]
source = "synthetic"
val_size = 50
synthetic_train = 250
synthetic_test = 100
[model]
num_heads = 2
conv_stem = "tiny"
patch_size = 4
[train]
batch_size = 64
warmup = 0
randaugment = [0, 9]
[report]
epochs = 2
warmup = 1
[space.embed_dim]
type = "int"
low = 8
high = 16
step = 8
[space.depth]
type = "int"
low = 1
high = 2
[space.lr]
type = "float"
low = 1e-3
high = 3e-3
log = true
"""


@contextlib.contextmanager
def one_thread():
    """torch on one thread: on a shared 2-core machine two spinning OpenMP threads per process
    made these tiny fits 30x slower (12 s instead of 0.35 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def build_tiny_study(folder: Path) -> tuple[str, str]:
    """A journal study with two completed trials, made by the real worker; (url, study name)."""
    path = folder / "tiny.toml"
    path.write_text(TINY_STUDY)
    config = load_study(str(path))
    url = f"journal:{folder / 'tiny.journal'}"
    studies.create_or_resume(backends.open_storage(url), url, config, config.trials)
    assert worker.run_worker(url, config.name, "cpu") == 0
    return url, config.name


# test_plots.py imports these fixtures, which gives them a second definition there; the cache
# makes both use one study and one report per session.
_session: dict = {}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    if "tiny" not in _session:
        folder = tmp_path_factory.mktemp("tiny")
        with one_thread():
            _session["tiny"] = (folder, *build_tiny_study(folder))
    return _session["tiny"]


def _args(url: str, out: Path, artifacts: Path, **kw) -> argparse.Namespace:
    return argparse.Namespace(storage=url, study=None, top=kw.get("top", 1), epochs=kw.get("epochs", 1),
                              out=str(out), device="cpu", artifacts=str(artifacts))


def _attach(url: str):
    return studies.attach(backends.open_storage(url), url, None)


@pytest.fixture(scope="session")
def reported(tiny):
    """One report run of the best trial (1 epoch per dataset): (folder, url, report.json)."""
    folder, url, _ = tiny
    if "reported" not in _session:
        with one_thread():
            assert commands.cmd_report(_args(url, folder / "report", folder / "artifacts")) == 0
        _session["reported"] = folder, url, json.loads((folder / "report" / "report.json").read_text())
    return _session["reported"]


def test_report_writes_every_field(reported, capsys):
    folder, url, report = reported
    study, config = _attach(url)
    for key in ("study", "created", "split", "budget", "targets", "device", "device_name", "software", "trials",
                "wall_seconds", "artifact_store", "data"):
        assert key in report, key
    assert report["split"] == "test" and report["budget"]["epochs"] == 1 and report["budget"]["source"] == "--epochs"
    assert {"python", "torch", "optuna"} <= set(report["software"])
    (t,) = report["trials"]
    best = max((x for x in study.trials if x.value is not None), key=lambda x: x.value)
    assert t["trial"] == best.number and t["params"] == best.params and t["seeds"] == {"train": 0, "split": 0}
    assert [r["dataset"] for r in t["datasets"]] == datasets_of(config)
    assert set(t["stage2"]) == {"global_tpe", "consistency", "robustness"}
    assert t["stage2"]["global_tpe"]["target"] == 0.70
    # The study records where each retrained model is, for `attention` and users.
    records = study.user_attrs[f"report:trial-{t['trial']}"]
    assert {d: r["artifact_id"] for d, r in records.items()} == {r["dataset"]: r["artifact_id"] for r in t["datasets"]}
    md = (folder / "report" / "report.md").read_text()
    assert "| Global TPE |" in md and "| emnist_letters |" in md and ("short by" in md or "OK" in md)


def test_report_metrics_are_nkat_metrics_of_test_accuracies(reported):
    _, _, report = reported
    (t,) = report["trials"]
    acc = [r["test_accuracy"] for r in t["datasets"]]
    params = [r["params"] for r in t["datasets"]]
    tpes = [metrics.local_tpe(a, p) for a, p in zip(acc, params)]
    assert [r["local_tpe"] for r in t["datasets"]] == tpes
    assert t["stage2"]["global_tpe"]["value"] == metrics.global_tpe(acc, params)
    assert t["stage2"]["consistency"]["value"] == metrics.consistency(tpes)
    assert t["stage2"]["robustness"]["value"] == metrics.robustness(tpes)
    for check in t["stage2"].values():
        assert check["ok"] == (check["value"] >= check["target"])
        assert check["short_by"] is None if check["ok"] else math.isclose(check["short_by"],
                                                                           check["target"] - check["value"])
    # Test accuracies, not the search's validation ones: the saved weights scored again on the
    # test split give exactly the reported figure.
    folder, url, _ = reported
    _, config = _attach(url)
    for r in t["datasets"]:
        model = retrain.load_model(folder / "report" / r["weights"])
        splits = load_splits(r["dataset"], config.data, "cpu")
        with one_thread():
            autocast = torch.bfloat16 if r["precision"] == "bfloat16" else None  # as the report trained and scored
            batch = train.eval_batch(TrainConfig(**r["train_config"]))
            test = train.evaluate(model, splits.test_x, splits.test_y, splits, batch, autocast)
        assert test == r["test_accuracy"], r["dataset"]


def test_rerun_reuses_finished_datasets(reported, monkeypatch):
    folder, url, first = reported
    calls = []
    real_fit = retrain.fit
    monkeypatch.setattr(retrain, "fit", lambda *a, **k: calls.append(a) or real_fit(*a, **k))
    assert commands.cmd_report(_args(url, folder / "report", folder / "artifacts")) == 0
    again = json.loads((folder / "report" / "report.json").read_text())
    assert calls == []
    assert all(r["reused"] for r in again["trials"][0]["datasets"])
    assert again["trials"][0]["stage2"] == first["trials"][0]["stage2"]
    # An interrupted report: one dataset's weights lost, only that one is trained again.
    (folder / "report" / f"trial-{first['trials'][0]['trial']}" /
     f"trial-{first['trials'][0]['trial']}-mnist.safetensors").unlink()
    assert commands.cmd_report(_args(url, folder / "report", folder / "artifacts")) == 0
    assert len(calls) == 1 and calls[0][1].epochs == 1
    # Another budget is another run: it trains again from the first dataset.
    class Trained(Exception):
        pass

    def refuse(model_cfg, train_cfg, splits, **kw):
        raise Trained(splits.spec.name, train_cfg.epochs)

    monkeypatch.setattr(retrain, "fit", refuse)
    with pytest.raises(Trained) as info:
        commands.cmd_report(_args(url, folder / "report", folder / "artifacts", epochs=2))
    assert info.value.args == ("cifar10", 2)


def test_artifact_round_trips(reported):
    folder, url, report = reported
    study, config = _attach(url)
    row = report["trials"][0]["datasets"][0]
    store = FileSystemArtifactStore(base_path=str(folder / "artifacts"))
    from_file = retrain.load_model(row["weights"])
    from_artifact = retrain.load_model(row["artifact_id"], artifact_store=store)
    a, b = from_file.state_dict(), from_artifact.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    splits = load_splits(row["dataset"], config.data)
    from nkat_search.data.loader import BatchLoader

    for x, _ in BatchLoader(splits.test_x, splits.test_y, splits.spec, 64, train=False):
        assert torch.equal(from_file(x), from_artifact(x))
    # The loaded weights are the ones that were scored: the same test accuracy at the precision
    # (bf16 autocast on CPUs with native bf16) and batch the report used.
    autocast = torch.bfloat16 if row["precision"] == "bfloat16" else None
    batch = train.eval_batch(TrainConfig(**row["train_config"]))
    assert train.evaluate(from_artifact, splits.test_x, splits.test_y, splits, batch, autocast) == row["test_accuracy"]


def test_no_completed_trials_is_a_usage_error(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_STUDY)
    config = load_study(str(path))
    url = f"journal:{tmp_path / 'empty.journal'}"
    studies.create_or_resume(backends.open_storage(url), url, config, 1)
    with pytest.raises(UsageError, match="no completed trials"):
        commands.cmd_report(_args(url, tmp_path / "out", tmp_path / "artifacts"))


def test_missing_weights_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not a file"):
        retrain.load_model(tmp_path / "nothing.safetensors")


def test_report_flags():
    args = main.build_parser().parse_args(["report", "--top", "2", "--epochs", "3"])
    assert args.func is commands.cmd_report and args.top == 2 and args.epochs == 3 and args.artifacts == "artifacts"
