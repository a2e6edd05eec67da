"""The search's progress on a terminal, as a person sees it: the real `nkat-search start` runs on a
pseudo-terminal, every byte it writes goes through a terminal emulator (pyte), and the tests read
the final screen, the lines scrolled off the top included (what `tmux capture-pane -S -` shows)."""

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pyte
import pytest
from helpers import ROOT, child_signals

COLUMNS, ROWS = 120, 40

# Variables by which rich would take a size or a kind of terminal from the environment instead of
# from the terminal itself.
RICH_OVERRIDES = ("COLUMNS", "LINES", "TTY_COMPATIBLE", "TTY_INTERACTIVE")

# Where a log line starts: `12:00:01 INFO ...` (ours), `[I 2026-01-01 12:00:01,123] ...` (Optuna's).
LOG_START = re.compile(r"\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) |\[[DIWEC] \d{4}-\d\d-\d\d ")


def on_terminal(*args: str, cwd, timeout: float = 180) -> tuple[int, list[str]]:
    """Run `nkat-search ARGS` with stdin, stdout and stderr on a pseudo-terminal of COLUMNS x ROWS;
    its exit code and the lines of the emulated screen at the end, scrolled-off lines first."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    env = {key: value for key, value in os.environ.items() if key not in RICH_OVERRIDES}
    # This checkout's code, whatever the current folder (the study's, here) and the environment hold.
    path = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "nkat_search.cli", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=cwd,
        env={**env, "TERM": "xterm-256color", "PYTHONPATH": path},
        start_new_session=True,
        preexec_fn=child_signals,
    )
    os.close(slave)
    screen = pyte.HistoryScreen(COLUMNS, ROWS, history=10_000)
    stream = pyte.ByteStream(screen)
    try:
        _read_all(master, stream, proc, time.monotonic() + timeout)
    finally:
        os.close(master)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    scrolled = ["".join(line[x].data for x in range(COLUMNS)) for line in screen.history.top]
    lines = [line.rstrip() for line in scrolled + screen.display]
    while lines and not lines[-1]:
        lines.pop()
    return proc.returncode, lines


def _read_all(master: int, stream: pyte.ByteStream, proc: subprocess.Popen, deadline: float) -> None:
    """Feed the emulator until every writer has closed the terminal (Linux: EIO on the master)."""
    while True:
        if time.monotonic() > deadline:
            raise AssertionError(f"`nkat-search` did not end in time; screen so far:\n{_text(stream.listener)}")
        if not select.select([master], [], [], 0.5)[0]:
            continue
        try:
            data = os.read(master, 65536)
        except OSError:
            return
        if not data:
            return
        stream.feed(data)


def _text(screen: pyte.Screen) -> str:
    return "\n".join(line.rstrip() for line in screen.display)


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_the_final_screen_holds_one_line_per_trial_and_the_counts_once(tiny_study, tmp_path, workers):
    """While it runs the display is redrawn in place at the bottom; what stays is a line per
    finished trial, the log lines, each on a line of its own, and the display's last frame once.
    With worker processes the parent owns the terminal and prints the workers' lines."""
    trials = 4
    code, lines = on_terminal(
        "start",
        "--study",
        tiny_study(trials=trials),
        "--trials",
        str(trials),
        "--workers",
        str(workers),
        "--storage",
        f"journal:{tmp_path / 'tiny.journal'}",
        cwd=tmp_path,
    )
    screen = "\n".join(lines)
    assert code == 0, screen
    # One line per trial: its number, its state, then its value or its reason, and its time.
    ended = [
        m for line in lines if (m := re.search(r"\btrial (\d+) (complete|pruned|failed)( by \w+ \w+)? after ", line))
    ]
    assert sorted(int(m.group(1)) for m in ended) == list(range(trials)), screen
    # The counts and the best so far: the display's last frame, once, not a copy left per redraw.
    counts = [line for line in lines if line.startswith("tiny: ")]
    assert len(counts) == 1, screen
    assert re.fullmatch(
        rf"tiny: {trials} of {trials} finished, running 0, pruned \d+ \(pruner \d+, gate \d+\), "
        r"failed 0",
        counts[0],
    ), screen
    assert sum("best Global TPE" in line for line in lines) == 1, screen
    # No line written into another: a log line starts its screen line and is the only one on it,
    # and no running trial's row (its epoch bar) is left behind.
    for line in lines:
        starts = [m.start() for m in LOG_START.finditer(line)]
        assert starts in ([], [0]), f"a log line merged into another:\n{line}\n\n{screen}"
    assert not [line for line in lines if "━" in line or re.match(r"trial \d+: stage", line)], screen
