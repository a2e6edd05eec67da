"""Every row of docs/bad-input.md, run as a user would: the documented exit status and sentence,
no traceback, no password, nothing written to the storage.

The table is parsed from the document, so the document and the test cannot drift apart. CLI
start-up costs seconds (torch), so the rows run in a few subprocesses at once in one fixture and
the parametrised tests only look at the outcomes. Mistakes that cannot be a row (a closed
standard output, a port in use, a foreign study whose name is a path) have their own tests below.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from helpers import ROOT, TINY_STUDY
from pg_server import PASSWORD

DOC = ROOT / "docs" / "bad-input.md"
STUDY_NAME = "tiny"
WRONG_PASSWORD = "wrong-pw-SECRET"
# The passwords the rows put into URLs. Every other password in the table contains SECRET in each
# piece between its '@' and ':', so that no fragment of one can be printed unnoticed.
SECRETS = ("s3cret-pw", PASSWORD, WRONG_PASSWORD, "SECRET")
MAX_SECONDS = 60  # a bad input fails fast; an unreachable database must not hang

# Rows whose promise the program does not keep yet: each is expected to fail (strictly, so a fix
# shows up as a failure until its line here is removed). docs/bad-input.md lists them too.
KNOWN_DEFECTS: dict[str, str] = {}


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
    return read_table_text(path.read_text())


def read_table_text(text: str) -> list[Row]:
    rows = []
    for line in text.splitlines():
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
    from nkat_search.search import studies
    from nkat_search.search.study_file import load_study
    from nkat_search.storage import backends

    study_file.write_text(TINY_STUDY.format(name=STUDY_NAME, trials=4, gate=0.01))
    studies.create_or_resume(backends.open_storage(url), url, load_study(str(study_file)), 4)


def _files(tmp: Path) -> dict[str, bytes]:
    """Every file under {tmp} with its bytes: journals, databases, lock files, outputs. (Folders alone
    hold no state: `train --data-root DIR` may create DIR while it tries to download.)"""
    return {str(p.relative_to(tmp)): p.read_bytes() for p in sorted(tmp.rglob("*")) if p.is_file()}


def _storage_state(tmp: Path, pg: str | None):
    """What 'nothing written' compares: everything under {tmp} (storage files and the lock files beside
    them), and the database's studies and trials."""
    if pg is not None:
        import optuna

        return _files(tmp), sorted(
            (s.study_name, s.n_trials, sorted(s.user_attrs.items()))
            for s in optuna.get_all_study_summaries(pg, include_best_trial=False)
        )
    return _files(tmp)


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
    garbage = tmp / "garbage"  # a file that is neither a journal, a database nor TOML
    garbage.write_bytes(random.Random(row.id).randbytes(4096))
    subs["garbage"] = str(garbage)

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
            outcomes = pool.map(
                lambda r: run_row(
                    r, base / r.id, pg_server.url(names[r.id]), pg_server.url(names[r.id], password=WRONG_PASSWORD)
                ),
                rows,
            )
            return {r.id: o for r, o in zip(rows, outcomes)}
    finally:
        for name in names.values():
            pg_server.drop_database(name)


def _param(row: Row):
    marks = [pytest.mark.postgres] if row.postgres else []
    if row.id in KNOWN_DEFECTS:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_DEFECTS[row.id]))
    return pytest.param(row, id=row.id, marks=marks)


def test_the_table_covers_what_the_issue_lists():
    ids = {r.id for r in ROWS}
    assert len(ROWS) >= 15 and len(ids) == len(ROWS)
    assert {
        "malformed-toml",
        "unknown-key",
        "inverted-range",
        "unknown-dataset",
        "unknown-scheme",
        "unreachable-database",
        "pg-wrong-password",
        "study-not-found",
        "budget-zero",
        "different-definition",
        "train-offline",
        "data-root-not-writable",
        "train-device-missing",
        "worker-gpu-missing",
    } <= ids
    assert set(KNOWN_DEFECTS) <= ids, set(KNOWN_DEFECTS) - ids
    # Issue 15's classes of mistakes, several rows each (see the headings of docs/bad-input.md).
    text = DOC.read_text()
    for heading in (
        "Passwords",
        "Wrong types in a study file",
        "Study files that would fail every trial",
        "Flags",
        "Files, folders and ports",
        "Read-only commands",
        "Study names",
    ):
        section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
        assert len(read_table_text(section)) >= 3, heading
    listed = [
        line.split(":", 1)[0] for line in text.split("## Known defects", 1)[1].splitlines() if line.startswith("- ")
    ]
    documented = [rid for head in listed for rid in re.findall(r"`([a-z0-9-]+)`", head)]
    assert sorted(documented) == sorted(KNOWN_DEFECTS), "the document and KNOWN_DEFECTS list other rows"


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
    assert outcome.storage_after == outcome.storage_before, "the storage was written"
    assert outcome.seconds < MAX_SECONDS, f"took {outcome.seconds:.0f} s"  # last: on a loaded machine, the rest held


# ---------------------------------------------------------------------------------------------
# Mistakes that cannot be a row of the table


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("nkat-search")]


def _cli_with_stdout(args: list[str], stdout: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run nkat-search with its standard output closed-for-reading (`| head -c0` after head exited),
    closed outright (`>&-`) or full (`> /dev/full`)."""
    argv = [sys.executable, "-m", "nkat_search.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if stdout == "closed-pipe":
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the first byte: every write is a broken pipe
        try:
            proc = subprocess.Popen(argv, stdout=write, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
        finally:
            os.close(write)
        err = proc.communicate(timeout=2 * MAX_SECONDS)[1]
        return subprocess.CompletedProcess(argv, proc.returncode, "", err)
    if stdout == "closed-fd":
        return subprocess.run(
            ["bash", "-c", 'exec "$@" >&-', "bash", *argv],
            capture_output=True,
            text=True,
            env=env,
            cwd=cwd,
            timeout=2 * MAX_SECONDS,
        )
    with open("/dev/full", "w") as full:
        return subprocess.run(
            argv, stdout=full, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, timeout=2 * MAX_SECONDS
        )


STDOUT_CASES = {  # id: (how stdout is broken, the command, exit status, part of the one sentence)
    "status-into-closed-pipe": ("closed-pipe", ["status"], 141, "the output was closed before everything was written"),
    "leaderboard-into-closed-pipe": (
        "closed-pipe",
        ["leaderboard", "--format", "csv"],
        141,
        "the output was closed before everything was written",
    ),
    "status-with-stdout-closed": ("closed-fd", ["status"], 1, "the standard output is closed"),
    "status-into-full-disk": ("full", ["status"], 1, "No space left on device"),
}


@pytest.fixture(scope="module")
def stdout_outcomes(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Each STDOUT_CASES command on a storage that holds the tiny study, three at a time."""
    tmp = tmp_path_factory.mktemp("stdout")
    url = f"journal:{tmp}/study.journal"
    _create_study(tmp / "setup.toml", url)
    with ThreadPoolExecutor(max_workers=3) as pool:
        runs = pool.map(
            lambda case: _cli_with_stdout([*case[1], "--storage", url], case[0], tmp), STDOUT_CASES.values()
        )
        return dict(zip(STDOUT_CASES, runs))


@pytest.mark.slow
@pytest.mark.parametrize("case", STDOUT_CASES)
def test_a_closed_or_full_output_ends_with_one_sentence(stdout_outcomes, case):
    # `nkat-search status | head -c0`, `status >&-`, `status > /dev/full`: no traceback, no
    # "Exception ignored" from the interpreter's last flush, one line saying what happened.
    _, _, code, words = STDOUT_CASES[case]
    run = stdout_outcomes[case]
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr
    assert run.returncode == code, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nkat-search: ") and words in lines[0], run.stderr


@pytest.mark.slow
def test_dashboard_on_a_port_in_use_says_so_in_one_sentence(tmp_path):
    url = f"journal:{tmp_path}/study.journal"
    _create_study(tmp_path / "setup.toml", url)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-m", "nkat_search.cli", "dashboard", "--port", str(port), "--storage", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            cwd=tmp_path,
        )
        try:
            out, err = proc.communicate(timeout=2 * MAX_SECONDS)
        except subprocess.TimeoutExpired:  # it serves on a port someone else holds
            proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate()
    assert "Traceback" not in out + err, out + err
    assert proc.returncode == 1, out + err  # the command was right; the machine's port is taken
    errors = _error_lines(err)
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    assert errors[0].startswith("nkat-search: error: the address is already in use") and errors[0].endswith("."), err


@pytest.mark.slow
@pytest.mark.parametrize("host", ["999.1.1.1", "256.0.0.1", "192.0.2.1"])  # no address; nor one of this machine
def test_dashboard_on_a_wrong_host_names_it_in_one_sentence(tmp_path, host):
    url = f"journal:{tmp_path}/study.journal"
    _create_study(tmp_path / "setup.toml", url)
    run = subprocess.run(
        [sys.executable, "-m", "nkat_search.cli", "dashboard", "--host", host, "--port", "0", "--storage", url],
        capture_output=True,
        text=True,
        timeout=2 * MAX_SECONDS,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert "Traceback" not in run.stdout + run.stderr and run.returncode == 2, run.stderr
    errors = _error_lines(run.stderr)
    assert len(errors) == 1 and run.stderr.rstrip().endswith(errors[0]), run.stderr
    assert errors[0].startswith(f"nkat-search: error: --host {host!r} is not") and errors[0].endswith("."), errors


def test_a_model_too_large_for_memory_ends_train_with_one_sentence_and_exit_1(monkeypatch):
    from nkat_search.cli import main as cli

    oom = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you "
        "tried to allocate 1099511627776 bytes."
    )
    monkeypatch.setattr("nkat_search.data.loader.load_splits", lambda *a, **k: None)
    monkeypatch.setattr("nkat_search.train.fit", mock.Mock(side_effect=oom))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["train", "--data-source", "synthetic", "--embed_dim", "16384", "--device", "cpu"])
    assert code == 1 and "Traceback" not in err.getvalue(), err.getvalue()
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nkat-search: the model or the data does not fit"), lines


@pytest.mark.slow
def test_read_only_commands_answer_without_loading_torch(tmp_path):
    """status, leaderboard, studies and --help answer (or refuse) in a second: they do not import torch."""
    url = f"journal:{tmp_path}/study.journal"
    _create_study(tmp_path / "setup.toml", url)
    script = (
        "import contextlib, io, sys\nfrom nkat_search.cli import main as cli\nfor argv in sys.argv[1:]:\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        cli.main(argv.split())\nprint('torch' in sys.modules)"
    )
    commands = [
        f"status --storage {url}",
        f"leaderboard --storage {url}",
        f"status --storage {url}x",
        "studies",
        "--help",
        "status --help",
    ]
    run = subprocess.run(
        [sys.executable, "-c", script, *commands], capture_output=True, text=True, cwd=tmp_path, timeout=2 * MAX_SECONDS
    )
    assert run.stdout.strip() == "False", run.stdout + run.stderr


FOREIGN_NAMES = ["../../escape", "/tmp/nkat-absolute", "..", "a/../../b"]


@pytest.mark.parametrize("name", FOREIGN_NAMES)
def test_a_foreign_study_name_cannot_lead_outputs_out_of_their_folder(tmp_path, monkeypatch, name):
    """A study that nkat-search did not name (optuna copy-study, another tool) may be called anything;
    plots, report and attention put their default outputs under ./reports all the same."""
    import optuna

    from nkat_search.cli import main as cli
    from nkat_search.storage import backends

    url = f"journal:{tmp_path}/study.journal"
    _create_study(tmp_path / "setup.toml", url)
    optuna.copy_study(
        from_study_name=STUDY_NAME,
        from_storage=backends.open_storage(url),
        to_storage=backends.open_storage(url),
        to_study_name=name,
    )
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    outs = []  # report and attention retrain or load weights; here they only say where they would write
    monkeypatch.setattr("nkat_search.outputs.official.build_report", lambda *a, out, **k: outs.append(out) or {})
    monkeypatch.setattr("nkat_search.outputs.official.format_markdown", lambda report: "")
    monkeypatch.setattr("nkat_search.outputs.attention.attention", lambda *a: outs.append(a[5]) or [None])
    before = set(tmp_path.rglob("*"))
    for args in (["plots", "--no-png", "--no-dashboard"], ["report", "--device", "cpu"], ["attention", "--trial", "0"]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli.main([*args, "--storage", url, "--study", name])
        assert code == 0, err.getvalue()
    assert len(outs) == 2
    for out in outs:
        assert (work / out).resolve().is_relative_to(work / "reports"), out
    created = set(tmp_path.rglob("*")) - before  # files and folders
    assert created and all(p.resolve().is_relative_to(work / "reports") for p in created), created
    assert not Path("/tmp/nkat-absolute").exists()
