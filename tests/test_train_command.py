"""`nkat-search train`: the study's recipe by default, the research's by name, flags over single
fields, and one trial of a stored study retrained exactly as the search trained it."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import optuna
import pytest
from helpers import cli

from nkat_search.cli.main import main
from nkat_search.config import TrainConfig
from nkat_search.search.study_file import load_study
from nkat_search.storage import backends

SMALL = ["--embed_dim", "16", "--depth", "1", "--num_heads", "2", "--data-source", "synthetic", "--limit_train", "1"]


def train(*args: str) -> list[dict]:
    """`nkat-search train ARGS --json` in this process: one JSON object per dataset trained."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", *args, "--json"]) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_train_takes_round2s_recipe_for_the_dataset_unless_told_otherwise():
    round2 = load_study("round2")
    (default,) = train("--dataset", "mnist", *SMALL)
    assert default["recipe"] == "study nkat-round2"
    recipe = dataclasses.replace(round2.recipe("mnist"), epochs=round2.stage2_epochs, limit_train=1)
    assert default["train_config"] == json.loads(json.dumps(dataclasses.asdict(recipe)))
    assert default["train_config"]["randaugment"] == [0, 9]  # the MNIST family trains without augmentation
    (research,) = train("--dataset", "mnist", "--recipe", "research", *SMALL)
    assert research["recipe"] == "research" and research["train_config"]["randaugment"] == list(
        TrainConfig().randaugment
    )
    (flagged,) = train("--dataset", "mnist", "--study", "smoke", "--cutout", "4", "--epochs", "2", *SMALL)
    assert flagged["recipe"] == "study nkat-smoke"
    assert flagged["train_config"]["cutout"] == 4 and flagged["epochs"] == 2
    assert flagged["train_config"]["batch_size"] == load_study("smoke").recipe("mnist").batch_size


def test_train_research_recipe_refuses_a_study_in_one_sentence(capsys):
    assert main(["train", "--recipe", "research", "--study", "smoke"]) == 2
    err = capsys.readouterr().err
    assert "--recipe research uses no study" in err and "Traceback" not in err


@pytest.mark.slow
def test_train_trial_retrains_a_trial_as_the_search_trained_it(tiny_study, tmp_path):
    url = f"journal:{tmp_path / 's.journal'}"
    path = tiny_study(trials=1)
    run = cli("start", "--study", path, "--storage", url)
    assert run.returncode == 0, run.stderr
    (trial,) = optuna.load_study(study_name="tiny", storage=backends.open_storage(url)).get_trials()
    results = train("--trial", "0", "--storage", url)
    assert [r["dataset"] for r in results] == ["cifar10", "mnist"]  # the study's datasets, in its order
    for r in results:  # the same configuration, recipe, data and seed: the same accuracy, to the bit
        assert r["recipe"] == "trial 0 of tiny"
        assert r["model_config"]["embed_dim"] == trial.params["embed_dim"]
        assert r["accuracy"] == trial.user_attrs[f"{r['dataset']}_accuracy"], (r, trial.user_attrs)
    (again,) = train("--trial", "0", "--storage", url, "--dataset", "mnist", "--epochs", "2")
    assert again["epochs"] == 2
    code = main(["train", "--trial", "7", "--storage", url])
    assert code == 2
