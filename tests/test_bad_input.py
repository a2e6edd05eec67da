"""Every row of docs/bad-input.md, run as a user would: the documented exit status and sentence,
no traceback, no password, nothing written to the storage.

The table is parsed from the document, so the document and the test cannot drift apart. CLI
start-up costs seconds (torch), so the rows run in a few subprocesses at once in one fixture and
the parametrised tests only look at the outcomes.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, TINY_STUDY
from pg_server import PASSWORD

DOC = ROOT / "docs" / "bad-input.md"
STUDY_NAME = "tiny"
WRONG_PASSWORD = "wrong-pw-SECRET"
SECRETS = ("s3cret-pw", PASSWORD, WRONG_PASSWORD)  # the passwords the rows put into URLs
STORAGE_FILES = ("study.journal", "study.db", "nkat-search.journal")  # under {tmp}; the last is the default
MAX_SECONDS = 60  # a bad input fails fast; an unreachable database must not hang

@dataclass(frozen=True)
class Row:
    id: str
    what: str
    existing: bool
    edits: tuple[tuple[str, str], ...]
    command: str
    exit: int
    message: str

    @property
    def postgres(self) -> bool:
        return "{pg" in self.command


def _unquote(cell: str) -> str:
    cell = cell.strip()
    return cell[1:-1] if cell.startswith("`") and cell.endswith("`") else cell


def read_table(path: Path = DOC) -> list[Row]:
    rows = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if not line.startswith("|") or len(cells) != 6 or cells[0] in ("id", "---"):
            continue
        rid, what, setup, command, exit_, message = cells
        edits = tuple(re.findall(r"`([^`]*)` → `([^`]*)`", setup))
        rows.append(Row(rid, what, "existing" in setup, edits, _unquote(command), int(exit_), _unquote(message)))
    return rows


ROWS = read_table()


def _study_text(row: Row) -> str:
    text = TINY_STUDY.format(name=STUDY_NAME, trials=4, gate=0.01)
    for old, new in row.edits:
        assert old in text, f"{row.id}: the setup edit {old!r} does not match the tiny study"
        text = text.replace(old, new)
    return text


def _create_study(study_file: Path, url: str) -> None:
    """The storage holds the study made from the unchanged tiny study (setup `existing`)."""
    from nkat_search import storage
    from nkat_search.study import load_study

    study_file.write_text(TINY_STUDY.format(name=STUDY_NAME, trials=4, gate=0.01))
    storage.create_or_resume(storage.open_storage(url), url, load_study(str(study_file)), 4)


def _storage_state(tmp: Path, pg: str | None):
    """What 'nothing written' compares: the storage files' bytes, or the database's studies and trials."""
    if pg is not None:
        import optuna

        return sorted((s.study_name, s.n_trials, sorted(s.user_attrs.items()))
                      for s in optuna.get_all_study_summaries(pg, include_best_trial=False))
    return {name: (tmp / name).read_bytes() if (tmp / name).exists() else None for name in STORAGE_FILES}


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    storage_before: object
    storage_after: object
    subs: dict


def run_row(row: Row, tmp: Path, pg: str | None = None, pg_wrong: str | None = None) -> Outcome:
    """Prepare the row's directory (and storage), run its command, and record what happened."""
    tmp.mkdir(parents=True, exist_ok=True)
    subs = {"tmp": str(tmp), "storage": f"journal:{tmp}/study.journal", "pg": pg or "", "pg_wrong": pg_wrong or ""}
    if row.existing:
        _create_study(tmp / "setup.toml", pg or subs["storage"])
    study = tmp / "study.toml"
    study.write_text(_study_text(row))
    subs["study"] = str(study)

    words = shlex.split(row.command.format(**subs))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while "=" in words[0]:  # leading NAME=value: environment, as in a shell
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    assert words[0] == "nkat-search", row.command
    argv = [sys.executable, "-m", "nkat_search.cli", *words[1:]]

    before = _storage_state(tmp, pg)
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp, timeout=2 * MAX_SECONDS)
    seconds = time.monotonic() - started
    return Outcome(done.returncode, done.stdout, done.stderr, seconds, before, _storage_state(tmp, pg), subs)


@pytest.fixture(scope="session")
def local_outcomes(tmp_path_factory) -> dict[str, Outcome]:
    """Every row without a server, three subprocesses at a time."""
    rows = [r for r in ROWS if not r.postgres]
    base = tmp_path_factory.mktemp("bad-input")
    with ThreadPoolExecutor(max_workers=3) as pool:
        outcomes = pool.map(lambda r: run_row(r, base / r.id), rows)
        return {r.id: o for r, o in zip(rows, outcomes)}


@pytest.fixture(scope="session")
def pg_outcomes(pg_server, tmp_path_factory) -> dict[str, Outcome]:
    """Every PostgreSQL row, each on a fresh database of the test server."""
    rows = [r for r in ROWS if r.postgres]
    base = tmp_path_factory.mktemp("bad-input-pg")
    names = {r.id: f"bad_{uuid.uuid4().hex[:12]}" for r in rows}
    for name in names.values():
        pg_server.create_database(name)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            outcomes = pool.map(lambda r: run_row(r, base / r.id, pg_server.url(names[r.id]),
                                                  pg_server.url(names[r.id], password=WRONG_PASSWORD)), rows)
            return {r.id: o for r, o in zip(rows, outcomes)}
    finally:
        for name in names.values():
            pg_server.drop_database(name)


def _param(row: Row):
    marks = [pytest.mark.postgres] if row.postgres else []
    return pytest.param(row, id=row.id, marks=marks)


def test_the_table_covers_what_the_issue_lists():
    ids = {r.id for r in ROWS}
    assert len(ROWS) >= 15 and len(ids) == len(ROWS)
    assert {"malformed-toml", "unknown-key", "inverted-range", "unknown-dataset", "unknown-scheme",
            "unreachable-database", "pg-wrong-password", "study-not-found", "budget-zero", "different-definition",
            "train-offline", "data-root-not-writable", "train-device-missing", "worker-gpu-missing"} <= ids


@pytest.mark.slow
@pytest.mark.parametrize("row", [_param(r) for r in ROWS])
def test_bad_input_is_refused_with_one_sentence_and_nothing_written(row: Row, request):
    outcome: Outcome = request.getfixturevalue("pg_outcomes" if row.postgres else "local_outcomes")[row.id]
    output = outcome.stdout + outcome.stderr
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("nkat-search:")]

    assert "Traceback" not in output, output
    assert not [s for s in SECRETS if s in output], output
    assert outcome.returncode == row.exit, output
    assert len(errors) == 1 and outcome.stderr.rstrip().endswith(errors[0]), outcome.stderr
    line = errors[0]
    assert line.startswith("nkat-search: error: ") and line.endswith("."), line
    assert row.message.format(**outcome.subs) in line, line
    assert outcome.seconds < MAX_SECONDS, f"took {outcome.seconds:.0f} s"
    assert outcome.storage_after == outcome.storage_before, "the storage was written"
