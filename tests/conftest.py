"""Shared fixtures. The PostgreSQL server fixtures (pg_server, pg_url) live in pg_server.py."""

import pytest

pytest_plugins = ["pg_server"]


@pytest.fixture(autouse=True)
def _small_threads(monkeypatch):
    # Tests run beside each other's subprocesses on 2 cores; keep heartbeats quick for fault tests.
    monkeypatch.setenv("NKAT_SEARCH_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("NKAT_SEARCH_GRACE_PERIOD", "4")
