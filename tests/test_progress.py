"""Progress: the live display on a terminal (a rich console that believes it is one, read back
through a terminal emulator, and a real pseudo-terminal for one process), plain log lines without
one, counts from the storage, worker processes relaying to their parent. The whole command on a
terminal: test_terminal.py."""

import datetime
import io
import logging
import os
import pty
import queue
import select
import subprocess
import sys
import time

import optuna
import pyte
import pytest
from optuna.trial import TrialState, create_trial
from rich.console import Console

from nkat_search.outputs import counts
from nkat_search.outputs.progress import Relay, StudyProgress, TrainProgress

T0 = datetime.datetime(2026, 1, 1, 12, 0, 0)


def _study(budget: int = 50) -> optuna.Study:
    """Trials as the worker leaves them: 2 complete (10 s and 30 s), pruned by the gate, by the
    pruner and by a non-finite loss, 1 failed, 1 running elsewhere."""
    study = optuna.create_study(direction="maximize", study_name="nkat-smoke")
    study.set_user_attr("budget", budget)

    def add(state, seconds=None, value=None, **attrs):
        trial = create_trial(state=state, value=value, user_attrs=attrs)
        trial.datetime_start = T0
        trial.datetime_complete = T0 + datetime.timedelta(seconds=seconds) if seconds is not None else None
        study.add_trial(trial)

    add(TrialState.COMPLETE, 10, value=9.5)
    add(TrialState.COMPLETE, 30, value=12.25)
    add(TrialState.PRUNED, 5, prune_reason="gate: local TPE 2.1000 < 3.0 after epoch 3")
    add(TrialState.PRUNED, 2, prune_reason="pruner (percentile): local TPE 1.2 at epoch 2")
    add(TrialState.PRUNED, 3, prune_reason="non-finite loss: the training loss became nan")
    add(TrialState.FAIL, 1, fail_reason="RuntimeError: out of memory")
    add(TrialState.RUNNING)
    return study


@pytest.mark.parametrize(
    "params, line",
    [
        (
            {
                "conv_stem": "tiny",
                "patch_size": 2,
                "embed_dim": 384,
                "depth": 7,
                "temperature": 0.7053,
                "top_p": 0.85,
                "lr": 2.1234e-4,
            },
            "stem=tiny p=2 d=384x7 T=0.71 top_p=0.85 lr=2.1e-4",
        ),
        ({"lr": 0.003, "embed_dim": 96, "nkat_strength": 0.0024, "top_k": 6}, "d=96 lr=3e-3 s=2.4e-3 top_k=6"),
        ({"mixup": 0.25, "color_norm": False}, "mixup=0.25 color_norm=False"),
    ],
)
def test_compact_parameters(params, line):
    assert counts.compact(params) == line


def test_counts_come_from_the_storage():
    c = counts.count(_study())
    assert (c.budget, c.complete, c.pruner, c.gate, c.other_pruned, c.failed, c.running) == (50, 2, 1, 1, 1, 1, 1)
    assert (c.finished, c.pruned, c.best_value, c.best_trial) == (5, 3, 12.25, 1)
    assert c.mean_seconds == pytest.approx((10 + 30 + 5 + 2 + 3) / 5)
    # 45 trials left at 10 s each, one running at a time.
    assert c.eta() == pytest.approx(450)
    assert counts.summary("nkat-smoke", c) == (
        "nkat-smoke: 5 of 50 finished, running 1, pruned 3 (pruner 1, gate 1, other 1), failed 1"
    )
    # Warm-start copies (or anything `counted` rejects) stay out of the counts.
    assert counts.count(_study(), counted=lambda t: t.number != 1).best_value == 9.5


@pytest.mark.parametrize("seconds, text", [(None, "-"), (5, "0:05"), (65.4, "1:05"), (3723, "1:02:03")])
def test_clock_text(seconds, text):
    assert counts.clock_text(seconds) == text


def test_without_a_terminal_one_plain_line_per_trial_event(caplog):
    study = _study()
    caplog.set_level(logging.INFO, logger="nkat_search")
    stream = io.StringIO()  # not a TTY
    with StudyProgress(study, stream=stream) as view:
        assert not view.live
        view.trial_started(7, {"conv_stem": "tiny", "patch_size": 2, "embed_dim": 96, "lr": 2.1e-3})
        view.stage(7, 1, "cifar10", 3)
        for epoch in (1, 2, 3):
            view.epoch(7, epoch, 3, 0.3 + 0.1 * epoch, 2.0 + epoch)
        view.stage(7, 2, "mnist", 2)
        trial = study.ask()
        study.tell(trial, 20.0)
        view.trial_ended(study.trials[-1], 12.34)
        study.add_trial(create_trial(state=TrialState.PRUNED, user_attrs={"prune_reason": "gate: local TPE 2.1 < 3.0"}))
        view.trial_ended(study.trials[-1], 3.0)
        study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "RuntimeError: boom"}))
        view.trial_ended(study.trials[-1], 1.0)
        # Without measured seconds, the storage's start and completion times give the duration.
        trial = create_trial(state=TrialState.COMPLETE, value=1.0)
        trial.datetime_start, trial.datetime_complete = T0, T0 + datetime.timedelta(seconds=4.5)
        study.add_trial(trial)
        view.trial_ended(study.trials[-1])
    ours = [r for r in caplog.records if r.name == "nkat_search"]
    assert [r.getMessage() for r in ours if r.levelno >= logging.INFO] == [
        "trial 7 started: stem=tiny p=2 d=96 lr=2.1e-3",
        "trial 7 complete after 12.3 s: Global TPE 20.0000 (best 20.0000, trial 7); 6 of 50 finished",
        "trial 8 pruned by the gate after 3.0 s: gate: local TPE 2.1 < 3.0; 7 of 50 finished",
        "trial 9 failed after 1.0 s: RuntimeError: boom; 7 of 50 finished",
        "trial 10 complete after 4.5 s: Global TPE 1.0000 (best 20.0000, trial 7); 8 of 50 finished",
    ]
    assert ours[-2].levelno == logging.ERROR
    assert stream.getvalue() == ""  # nothing drawn


def test_epochs_and_full_parameters_are_debug_lines(caplog):
    caplog.set_level(logging.DEBUG, logger="nkat_search")
    with StudyProgress(_study(), stream=io.StringIO()) as view:
        view.trial_started(7, {"embed_dim": 96, "lr": 0.00123456})
        view.stage(7, 1, "cifar10", 3)
        view.epoch(7, 3, 3, 0.5, 6.0)
    debug = [r.getMessage() for r in caplog.records if r.name == "nkat_search" and r.levelno == logging.DEBUG]
    assert "trial 7 parameters: {'embed_dim': 96, 'lr': 0.00123456}" in debug
    assert "trial 7 stage 1 cifar10 epoch 3/3: val accuracy 0.5000, local TPE 6.0000" in debug


def test_on_a_terminal_one_live_display_with_counts_times_and_the_current_epoch():
    study = _study()
    now = [100.0]
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system="standard")
    with StudyProgress(study, console=console, clock=lambda: now[0]) as view:
        assert view.live
        view.trial_started(7, {"embed_dim": 96})
        view.stage(7, 2, "fashion_mnist", 4)
        view.epoch(7, 3, 4, 0.8125, 11.5)
        now[0] += 125
        console.print(view.render())
    text = out.getvalue()
    assert "\x1b[" in text  # drawn with terminal control sequences, not printed as lines
    assert "nkat-smoke: 5 of 50 finished, running 1, pruned 3 (pruner 1, gate 1, other 1), failed 1" in text
    assert "best Global TPE 12.25 (trial 1), elapsed 2:05, ETA 7:30" in text
    assert "trial 7: stage 2 fashion_mnist" in text and "epoch 3 of 4" in text
    assert "val accuracy 0.812, local TPE 11.5" in text


def _screen(output: str, columns: int = 100, rows: int = 20) -> list[str]:
    """The lines a terminal shows after `output` (a rich console's, with its cursor movements)."""
    screen = pyte.Screen(columns, rows)
    screen.set_mode(pyte.modes.LNM)  # a newline returns the carriage, as a terminal's output driver does
    pyte.Stream(screen).feed(output)
    return [line.rstrip() for line in screen.display if line.strip()]


def test_live_display_prints_log_lines_above_itself():
    """A log line written while the display runs gets a line of its own above the display, and the
    display is redrawn below it, not left behind: the handler writes through the console."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("nkat_search")
    logger.addHandler(handler)
    console = Console(file=out, force_terminal=True, width=100, height=20)
    try:
        with StudyProgress(_study(), stream=out, console=console, clock=lambda: 100.0) as view:
            view.trial_started(7, {"embed_dim": 96})
            view.stage(7, 1, "cifar10", 3)
            logger.warning("a warning while the display runs")
            view.epoch(7, 1, 3, 0.5, 6.0)
            logger.warning("another one")
        assert handler.stream is out  # given back when the display ends
    finally:
        logger.removeHandler(handler)
    assert _screen(out.getvalue()) == [
        "WARNING a warning while the display runs",
        "WARNING another one",
        "nkat-smoke: 5 of 50 finished, running 1, pruned 3 (pruner 1, gate 1, other 1), failed 1",
        # The last frame: the times without an ETA, and the trial still running here with its bar.
        "best Global TPE 12.25 (trial 1), elapsed 0:00",
        "trial 7: stage 1 cifar10 ━━━━━━╸━━━━━━━━━━━━━ epoch 1 of 3 val accuracy 0.500, local TPE 6",
    ]


def test_a_parent_shows_what_its_worker_processes_relay(caplog):
    """`--workers N` on a terminal: the workers draw nothing; their events and log records reach the
    parent's view, which logs one line per finished trial and keeps a row per running trial."""
    caplog.set_level(logging.INFO, logger="nkat_search")
    study = _study()
    parent = StudyProgress(study, live=False)
    box: queue.Queue = queue.Queue()
    worker = Relay(box)
    with parent.listen(box):
        box.put(logging.LogRecord("nkat_search", logging.INFO, __file__, 1, "[cpu pid 9] attached", None, None))
        worker.trial_started(7, {"embed_dim": 96})
        worker.stage(7, 1, "cifar10", 3)
        worker.trial_started(8, {"embed_dim": 8})
        worker.stage(8, 2, "mnist", 4)
        worker.epoch(8, 3, 4, 0.75, 9.0)
        trial = study.ask()
        study.tell(trial, 30.0)
        worker.trial_ended(study.trials[-1], 2.0)
    # Leaving listen shows what the workers left: trial 7 ended, trial 8 runs on.
    assert parent.current == {
        8: {"stage": 2, "dataset": "mnist", "epoch": 3, "epochs": 4, "accuracy": 0.75, "tpe": 9.0}
    }
    assert [r.getMessage() for r in caplog.records if r.name == "nkat_search"] == [
        "[cpu pid 9] attached",
        "trial 7 started: d=96",
        "trial 8 started: d=8",
        "trial 7 complete after 2.0 s: Global TPE 30.0000 (best 30.0000, trial 7); 6 of 50 finished",
    ]


def test_train_progress_plain_and_live(caplog):
    caplog.set_level(logging.INFO, logger="nkat_search")
    with TrainProgress("cifar10", 3, stream=io.StringIO()) as on_epoch:
        on_epoch(1, 0.25, 2.5)
    assert [r.getMessage() for r in caplog.records] == ["epoch 1/3  val accuracy 0.2500  local TPE 2.5000"]
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with TrainProgress("cifar10", 3, console=console) as on_epoch:
        on_epoch(2, 0.5, 5.0)
    assert "2/3" in out.getvalue() and "val accuracy 0.5000, local TPE 5.0000" in out.getvalue()


CHILD = """
import logging, sys, datetime
import optuna
from optuna.trial import TrialState
sys.path.insert(0, {tests!r})
from test_progress import _study
from nkat_search.outputs.progress import StudyProgress
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = _study()
with StudyProgress(study) as view:
    print("live" if view.live else "plain", file=sys.stderr, flush=True)
    view.trial_started(7, {{"embed_dim": 96}})
    view.stage(7, 1, "cifar10", 3)
    view.epoch(7, 1, 3, 0.5, 6.0)
    trial = study.ask()
    study.tell(trial, 30.0)
    view.trial_ended(study.trials[-1], 2.0)
"""


@pytest.mark.slow
def test_a_real_terminal_gets_the_live_display():
    """One process with its stderr on a pseudo-terminal, as `nkat-search start` in a shell."""
    master, slave = pty.openpty()
    script = CHILD.format(tests=os.path.dirname(__file__))
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"},
    )
    os.close(slave)
    chunks, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=10)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, text
    assert "live" in text and "\x1b[" in text
    assert "running 1" in text and "best Global TPE" in text
    # The finished trial's line is printed above the display, once.
    assert text.count("trial 7 complete after 2.0 s: Global TPE 30.0000") == 1
