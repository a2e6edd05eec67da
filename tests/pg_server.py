"""A real, throwaway PostgreSQL server for tests marked `postgres`.

Fixtures: `pg_server` (session: one cluster, with stop/start/restart for fault tests) and
`pg_url` (function: a fresh database on it, as an SQLAlchemy URL).

Where PostgreSQL cannot be started the tests that use these fixtures are skipped, except under
CI (env CI set), where they fail: CI must run them.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest

# We write our own fixture instead of using pytest-postgresql because its executor runs initdb
# and pg_ctl as the current user in directories it creates itself, so running them as the
# `postgres` OS user (needed when tests run as root) would take a wrapper plus chown hacks.

USER = "nkat"
PASSWORD = "nkat-test-pw"
ADMIN_DB = "postgres"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL could not be found or started here."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def find_bindir() -> Path:
    """Directory with initdb and pg_ctl: $PG_BINDIR, else the newest /usr/lib/postgresql/N/bin, else PATH."""
    candidates = [os.environ.get("PG_BINDIR", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    which = shutil.which("pg_ctl")
    candidates.append(str(Path(which).parent) if which else "")
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; install them with "
        "`apt-get install -y postgresql` or point PG_BINDIR at their directory"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One PostgreSQL cluster in a temp dir, listening on 127.0.0.1:port with password auth."""

    def __init__(self, bindir: Path, root: Path, port: int, as_postgres_user: bool, max_connections: int = 200) -> None:
        self.bindir, self.root, self.port, self.max_connections = bindir, root, port, max_connections
        self.datadir, self.logfile = root / "data", root / "server.log"
        self.startup_seconds = 0.0  # initdb + first start, for the session summary
        # PostgreSQL refuses to run as root, so as root every server command runs as `postgres`.
        self._prefix = ["runuser", "-u", "postgres", "--"] if as_postgres_user else []

    def _run(self, *argv: str, timeout: float = 60) -> None:
        done = subprocess.run(self._prefix + list(argv), capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise PostgresUnavailable(
                f"{Path(argv[0]).name} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
                f"\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 20) -> str:
        if not self.logfile.exists():
            return ""
        return "server log:\n" + "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])

    def init(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self._prefix:
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.datadir),
            f"--username={USER}",
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--no-sync",
        )
        pwfile.unlink()
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write(
                "\nlisten_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\n"
                f"max_connections = {self.max_connections}\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            )

    def start(self) -> None:
        self._run(
            str(self.bindir / "pg_ctl"), "start", "-w", "-t", "30", "-D", str(self.datadir), "-l", str(self.logfile)
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; mode "immediate" is a crash (no shutdown checkpoint), "fast" a clean stop."""
        self._run(str(self.bindir / "pg_ctl"), "stop", "-w", "-t", "30", "-m", mode, "-D", str(self.datadir))

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    @property
    def running(self) -> bool:
        argv = self._prefix + [str(self.bindir / "pg_ctl"), "status", "-D", str(self.datadir)]
        return subprocess.run(argv, capture_output=True).returncode == 0

    def url(self, dbname: str, password: str = PASSWORD) -> str:
        return f"postgresql+psycopg://{USER}:{password}@127.0.0.1:{self.port}/{dbname}"

    def _admin(self, statement, params=None) -> list[tuple]:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=USER, password=PASSWORD, dbname=ADMIN_DB, autocommit=True
        ) as conn:
            cursor = conn.execute(statement, params)
            return cursor.fetchall() if cursor.description else []

    def query(self, statement, params=None) -> list[tuple]:
        """Rows of one statement run on the admin database (pg_stat_activity, pg_locks see every database)."""
        return self._admin(statement, params)

    def terminate_backends(self, dbname: str, pids: list[int] | None = None) -> int:
        """Drop every client connection of database `dbname` (or only those of the server processes
        `pids`), as a network fault or a failover would; gives how many were dropped."""
        rows = self._admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
            "AND pid <> pg_backend_pid() AND (%s::int[] IS NULL OR pid = ANY(%s::int[]))",
            (dbname, pids, pids),
        )
        return sum(1 for (ended,) in rows if ended)

    def destroy(self) -> None:
        """Stop the server and delete its files (for servers a test launched itself)."""
        if self.running:
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self, name: str) -> str:
        """Create database `name` owned by the test role; gives its URL."""
        from psycopg import sql

        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        from psycopg import sql

        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def launch(max_connections: int = 200) -> PostgresServer:
    """A new, running server of its own (the session's `pg_server` is one); call destroy() when done.
    Raises PostgresUnavailable where PostgreSQL cannot be started."""
    bindir = find_bindir()
    as_root = os.geteuid() == 0
    if as_root:
        if shutil.which("runuser") is None:
            raise PostgresUnavailable("running as root but `runuser` is missing (PostgreSQL refuses to run as root)")
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable(
                "running as root but there is no `postgres` OS user to run the server as"
            ) from None
    root = Path(tempfile.mkdtemp(prefix="nkat-pg-"))
    if as_root:
        shutil.chown(root, "postgres", "postgres")
    server = PostgresServer(bindir, root, free_port(), as_postgres_user=as_root, max_connections=max_connections)
    try:
        server.init()
        server.start()
    except Exception:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return server


def launch_or_skip(max_connections: int = 200) -> PostgresServer:
    """launch(), or skip the test (fail it under CI) where PostgreSQL cannot be started."""
    try:
        return launch(max_connections)
    except (PostgresUnavailable, OSError, subprocess.TimeoutExpired) as exc:
        reason = f"PostgreSQL test server unavailable: {exc}"
        if in_ci():
            pytest.fail(reason + " (CI is set, so postgres tests must run)", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session; skipped (failed under CI) if it cannot start."""
    started = time.monotonic()
    server = launch_or_skip()
    server.startup_seconds = time.monotonic() - started
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """URL of a fresh, empty database that is dropped after the test."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    url = pg_server.create_database(name)
    yield url
    if not pg_server.running:  # a fault test may leave the server stopped; later tests need it
        pg_server.start()
    pg_server.drop_database(name)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """One line saying how many `postgres` tests were skipped, and why."""
    reasons: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        if "postgres" in getattr(report, "keywords", {}):
            longrepr = report.longrepr
            reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
            reasons[reason.removeprefix("Skipped: ").splitlines()[0]] += 1
    if reasons:
        why = "; ".join(f"{r} ({n})" for r, n in reasons.most_common())
        terminalreporter.write_line(f"postgres: {sum(reasons.values())} test(s) skipped: {why}", yellow=True)
