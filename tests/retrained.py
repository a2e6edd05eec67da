"""Session fixtures shared by test_retrain and test_plots: one tiny study searched by the real worker
and one report of its best trial (registered in conftest.py's pytest_plugins)."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import pytest
import torch

from nkat_search.cli import commands
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


def build_tiny_study(folder: Path) -> tuple[str, str]:
    """A journal study with two completed trials, made by the real worker; (url, study name)."""
    path = folder / "tiny.toml"
    path.write_text(TINY_STUDY)
    config = load_study(str(path))
    url = f"journal:{folder / 'tiny.journal'}"
    studies.create_or_resume(backends.open_storage(url), url, config, config.trials)
    assert worker.run_worker(url, config.name, "cpu") == 0
    return url, config.name


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    with one_thread():
        return (folder, *build_tiny_study(folder))


def report_args(url: str, out: Path, artifacts: Path, **kw) -> argparse.Namespace:
    return argparse.Namespace(
        storage=url,
        study=None,
        top=kw.get("top", 1),
        epochs=kw.get("epochs", 1),
        out=str(out),
        device="cpu",
        artifacts=str(artifacts),
    )


def attach(url: str):
    return studies.attach(backends.open_storage(url), url, None)


@pytest.fixture(scope="session")
def reported(tiny):
    """One report run of the best trial (1 epoch per dataset): (folder, url, report.json)."""
    folder, url, _ = tiny
    with one_thread():
        assert commands.cmd_report(report_args(url, folder / "report", folder / "artifacts")) == 0
    return folder, url, json.loads((folder / "report" / "report.json").read_text())
