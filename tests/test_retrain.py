"""The official Stage-2 report on a tiny real study: tables, metrics, resumption, weights as artifacts."""

import json
import math

import pytest
import torch
from optuna.artifacts import FileSystemArtifactStore
from retrained import TINY_STUDY, attach, one_thread, report_args

from nkat_search import metrics, train
from nkat_search.cli import commands, main
from nkat_search.config import TrainConfig, UsageError
from nkat_search.data.loader import load_splits
from nkat_search.outputs import official as retrain
from nkat_search.outputs import weights
from nkat_search.outputs.tables import datasets_of
from nkat_search.search import studies
from nkat_search.search.study_file import load_study
from nkat_search.storage import backends


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def test_report_writes_every_field(reported, capsys):
    folder, url, report = reported
    study, config = attach(url)
    for key in (
        "study",
        "created",
        "split",
        "budget",
        "targets",
        "device",
        "device_name",
        "software",
        "trials",
        "wall_seconds",
        "artifact_store",
        "data",
    ):
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
        assert (
            check["short_by"] is None
            if check["ok"]
            else math.isclose(check["short_by"], check["target"] - check["value"])
        )
    # Test accuracies, not the search's validation ones: the saved weights scored again on the
    # test split give exactly the reported figure.
    folder, url, _ = reported
    _, config = attach(url)
    for r in t["datasets"]:
        model = weights.load_model(folder / "report" / r["weights"])
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
    assert commands.cmd_report(report_args(url, folder / "report", folder / "artifacts")) == 0
    again = json.loads((folder / "report" / "report.json").read_text())
    assert calls == []
    assert all(r["reused"] for r in again["trials"][0]["datasets"])
    assert again["trials"][0]["stage2"] == first["trials"][0]["stage2"]
    # An interrupted report: one dataset's weights lost, only that one is trained again.
    (
        folder
        / "report"
        / f"trial-{first['trials'][0]['trial']}"
        / f"trial-{first['trials'][0]['trial']}-mnist.safetensors"
    ).unlink()
    assert commands.cmd_report(report_args(url, folder / "report", folder / "artifacts")) == 0
    assert len(calls) == 1 and calls[0][1].epochs == 1

    # Another budget is another run: it trains again from the first dataset.
    class Trained(Exception):
        pass

    def refuse(model_cfg, train_cfg, splits, **kw):
        raise Trained(splits.spec.name, train_cfg.epochs)

    monkeypatch.setattr(retrain, "fit", refuse)
    with pytest.raises(Trained) as info:
        commands.cmd_report(report_args(url, folder / "report", folder / "artifacts", epochs=2))
    assert info.value.args == ("cifar10", 2)


def test_artifact_round_trips(reported):
    folder, url, report = reported
    study, config = attach(url)
    row = report["trials"][0]["datasets"][0]
    store = FileSystemArtifactStore(base_path=str(folder / "artifacts"))
    from_file = weights.load_model(row["weights"])
    from_artifact = weights.load_model(row["artifact_id"], artifact_store=store)
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
        commands.cmd_report(report_args(url, tmp_path / "out", tmp_path / "artifacts"))


def test_missing_weights_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not a file"):
        weights.load_model(tmp_path / "nothing.safetensors")


def test_report_flags():
    args = main.build_parser().parse_args(["report", "--top", "2", "--epochs", "3"])
    assert args.func is commands.cmd_report and args.top == 2 and args.epochs == 3 and args.artifacts == "artifacts"
