"""Shared fixtures. The PostgreSQL server fixtures (pg_server, pg_url) live in pg_server.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pg_server", "retrained"]


def child_signals() -> None:
    """preexec_fn of a child a test signals: SIGINT and SIGTERM at their defaults, whatever the test
    run inherited. Under `nohup` or a background job SIGINT is ignored, an ignored signal stays
    ignored across exec, and Python installs no KeyboardInterrupt handler for it: the child would
    never see the Ctrl-C the test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
ROOT = Path(__file__).resolve().parent.parent

TINY_STUDY = """
[study]
name = "{name}"
trials = {trials}

[sampler]
kind = "tpe"
seed = 0
n_startup_trials = 2

[pruner]
kind = "none"

[stage1]
dataset = "cifar10"
epochs = 1
gate = {gate}

[stage2]
datasets = ["mnist"]
epochs = 1

[data]
source = "synthetic"
val_size = 64
synthetic_train = 192
synthetic_test = 64

[model]
num_heads = 2

[train]
batch_size = 64
warmup = 0

[report]
epochs = 1

[space.embed_dim]
type = "int"
low = 8
high = 16
step = 8

[space.temperature]
type = "float"
low = 0.6
high = 1.0
"""


@pytest.fixture(autouse=True)
def _quick_heartbeats(monkeypatch):
    # Fault tests wait for the heartbeat grace period: keep it seconds, not minutes.
    monkeypatch.setenv("NKAT_SEARCH_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("NKAT_SEARCH_GRACE_PERIOD", "6")
    monkeypatch.setenv("NKAT_SEARCH_DB_RETRY_SECONDS", "4")  # grace > retry bound + interval
    # Tests run several worker processes at once on 2 cores: one thread each, no oversubscription.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def tiny_study(tmp_path):
    """Write a tiny study file (synthetic data, 8-16 wide one-block models) and give its path."""

    def write(name: str = "tiny", trials: int = 4, gate: float = 0.01, extra: str = "") -> str:
        path = tmp_path / f"{name}.toml"
        path.write_text(TINY_STUDY.format(name=name, trials=trials, gate=gate) + extra)
        return str(path)

    return write


def cli(*args: str, env: dict | None = None, timeout: float = 300, cwd=None) -> subprocess.CompletedProcess:
    """Run `nkat-search ARGS` in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "nkat_search.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd or ROOT)


def spawn(*args: str, env: dict | None = None, cwd=None) -> subprocess.Popen:
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "nkat_search.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=full_env, cwd=cwd or ROOT,
                            preexec_fn=child_signals)
