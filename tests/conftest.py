"""Shared fixtures. The PostgreSQL server fixtures (pg_server, pg_url) live in pg_server.py."""

from __future__ import annotations

import os

# One torch thread in the test processes too, set before anything imports torch: the suite runs
# several processes on 2 cores, and a second spinning OpenMP thread in each costs more than it
# gives (measured: the real-digits test took 48 s beside 2 other processes and 131 s beside 3).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from helpers import TINY_STUDY  # noqa: E402

pytest_plugins = ["pg_server", "retrained"]


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
