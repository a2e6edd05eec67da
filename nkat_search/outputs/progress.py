"""Progress of a search and of one training run, for the person watching.

On a terminal (the stream is a TTY) one rich live display, redrawn in place at the bottom, with
every log line (one per finished trial among them) printed above it; without one (a log file,
`docker logs`, CI) plain log lines, one per trial event, that read as a history.

StudyProgress is the worker loop's view of its study: the loop tells it what happens (trial
started, stage, epoch, trial ended) and it shows, from the study's trials in the storage (so the
other workers' trials count too): finished of budget, running, pruned (by the pruner, by the
gate), failed, the best Global TPE so far with its trial, elapsed time, an ETA from the measured
trial times, and each running trial's stage and epoch. TrainProgress is `nkat-search train`'s
per-epoch bar.

One process owns the terminal. Worker processes started by `--workers N` on a terminal draw
nothing: their Relay sends each event, and log_to_parent each log record, to the parent's
StudyProgress (listen), which shows them in its one display.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import math
import queue as queues
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

from .counts import Counts, clock_text, compact, count, prune_kind, summary

if typing.TYPE_CHECKING:  # rich is imported when a live display starts
    from rich.live import Live
    from rich.progress import Progress

log = logging.getLogger("nkat_search")


# A study is re-read from the storage at most this often (each epoch and trial end asks).
REFRESH_SECONDS = 1.0


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def on_terminal(stream=None) -> bool:
    """Whether the display would be drawn on `stream` (standard error by default)."""
    return _is_terminal(stream if stream is not None else sys.stderr)


@contextlib.contextmanager
def _logging_above(console, stream) -> Iterator[None]:
    """Meanwhile, every logging handler that writes to `stream` writes through rich's FileProxy of
    `console` instead, which prints each line above the live display. (Live's redirect_stderr
    replaces sys.stderr only; a handler keeps the stream object it was given, so its lines would
    land in the display's last line.)"""
    from rich.file_proxy import FileProxy

    proxy = FileProxy(console, stream)
    loggers = [
        logging.getLogger(),
        *(logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)),
    ]
    handlers = [
        h for logger in loggers for h in logger.handlers if isinstance(h, logging.StreamHandler) and h.stream is stream
    ]
    for h in handlers:
        h.setStream(proxy)
    try:
        yield
    finally:
        for h in handlers:
            h.setStream(stream)


def _redirects(console) -> dict:
    """Live's (and Progress's) redirect switches: other writes to standard error (and to standard
    output, when that is a terminal too) print above the display. Asked before Live starts: it
    replaces sys.stderr."""
    on_stderr = console.file is sys.stderr
    return {"redirect_stderr": on_stderr, "redirect_stdout": on_stderr and _is_terminal(sys.stdout)}


class StudyProgress:
    """A worker's view of its study: a live display on a terminal, log lines otherwise.

    Use as a context manager around the worker loop and call trial_started, stage, epoch and
    trial_ended as things happen. `counted` leaves trials out of the counts (warm-start copies).
    `console` (a rich Console) replaces the terminal, for tests."""

    def __init__(
        self,
        study: optuna.Study,
        *,
        stream=None,
        live: bool | None = None,
        counted: Callable[[FrozenTrial], bool] = lambda t: True,
        console=None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.study, self.counted, self.clock = study, counted, clock
        self.stream = stream if stream is not None else sys.stderr
        self.live = (console is not None or _is_terminal(self.stream)) if live is None else live
        self.console = console
        self.started = clock()
        self.counts: Counts | None = None
        self.read_at = -math.inf
        # The running trials' rows by trial number: stage, dataset, epoch, epochs, accuracy, tpe.
        # Replaced, never changed in place: the display's thread reads it while events arrive.
        self.current: dict[int, dict] = {}
        self.done = False
        self._live: Live | None = None
        self._exit: contextlib.ExitStack | None = None

    # -- the display ----------------------------------------------------------------------------

    def __enter__(self) -> StudyProgress:
        self.refresh(force=True)
        if self.live:
            from rich.console import Console
            from rich.live import Live

            console = self.console or Console(file=self.stream)
            with contextlib.ExitStack() as stack:
                stack.enter_context(_logging_above(console, self.stream))
                self._live = stack.enter_context(
                    Live(get_renderable=self.render, console=console, refresh_per_second=4, **_redirects(console))
                )
                self._exit = stack.pop_all()
            self._draw()
        return self

    def __exit__(self, *exc) -> None:
        if self._exit is not None:
            self.refresh(force=True)
            self.done = True  # the last frame stays on the screen: the final counts, once
            self._exit.close()
            self._exit, self._live = None, None

    def _draw(self) -> None:
        """Redraw now, not at the next of the display's 4 refreshes a second: an event changed it."""
        if self._live is not None:
            self._live.refresh()

    def refresh(self, force: bool = False) -> Counts:
        """Re-read the study's counts from the storage (at most every REFRESH_SECONDS unless forced)."""
        now = self.clock()
        if force or self.counts is None or now - self.read_at >= REFRESH_SECONDS:
            self.counts, self.read_at = count(self.study, self.counted), now
        return self.counts

    def render(self):
        """The live display: counts, best so far and times, then each running trial with its epoch bar."""
        from rich.console import Group
        from rich.text import Text

        c = self.counts or self.refresh()
        best = (
            f"best Global TPE {c.best_value:.4g} (trial {c.best_trial})"
            if c.best_value is not None
            else "best Global TPE - (no completed trial yet)"
        )
        times = f"elapsed {clock_text(self.clock() - self.started)}"
        if not self.done:
            times += f", ETA {clock_text(c.eta())}"
        lines = [Text(summary(self.study.study_name, c)), Text(f"{best}, {times}")]
        return Group(*lines, *(_row(number, now) for number, now in sorted(self.current.items())))

    # -- events ---------------------------------------------------------------------------------

    def trial_started(self, number: int, params: dict) -> None:
        self.current = {**self.current, number: {}}
        log.log(logging.DEBUG if self.live else logging.INFO, "trial %d started: %s", number, compact(params))
        log.debug("trial %d parameters: %s", number, params)
        self.refresh(force=True)
        self._draw()

    def stage(self, number: int, stage: int, dataset: str, epochs: int) -> None:
        """Trial `number` starts training on `dataset` (Stage 1 or 2) for `epochs` epochs."""
        self.current = {**self.current, number: {"stage": stage, "dataset": dataset, "epoch": 0, "epochs": epochs}}
        log.debug("trial %d stage %d %s: %d epochs", number, stage, dataset, epochs)
        self._draw()

    def epoch(self, number: int, epoch: int, epochs: int, accuracy: float, local_tpe: float) -> None:
        row = self.current.get(number, {})
        self.current = {
            **self.current,
            number: {**row, "epoch": epoch, "epochs": epochs, "accuracy": accuracy, "tpe": local_tpe},
        }
        log.debug(
            "trial %d stage %s %s epoch %d/%d: val accuracy %.4f, local TPE %.4f",
            number,
            row.get("stage", "?"),
            row.get("dataset", ""),
            epoch,
            epochs,
            accuracy,
            local_tpe,
        )
        self.refresh()
        self._draw()

    def trial_ended(self, trial: FrozenTrial, seconds: float | None = None) -> None:
        """Trial ended (COMPLETE, PRUNED or FAIL, as the storage has it): one line, fresh counts.
        Without `seconds`, the duration is the trial's start to completion in the storage."""
        self.current = {number: row for number, row in self.current.items() if number != trial.number}
        c = self.refresh(force=True)
        if seconds is None and trial.datetime_start and trial.datetime_complete:
            seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
        took = f" after {seconds:.1f} s" if seconds is not None else ""
        tally = f"{c.finished} of {c.budget if c.budget is not None else '?'} finished"
        if trial.state == TrialState.COMPLETE:
            best = f"best {c.best_value:.4f}, trial {c.best_trial}" if c.best_value is not None else ""
            log.info("trial %d complete%s: Global TPE %.4f (%s); %s", trial.number, took, trial.value, best, tally)
        elif trial.state == TrialState.PRUNED:
            kind = {"gate": "by the gate", "pruner": "by the pruner"}.get(prune_kind(trial), "")
            reason = trial.user_attrs.get("prune_reason", "")
            log.info("trial %d pruned%s%s: %s; %s", trial.number, f" {kind}" if kind else "", took, reason, tally)
        else:
            log.error("trial %d failed%s: %s; %s", trial.number, took, trial.user_attrs.get("fail_reason", "?"), tally)
        self._draw()

    # -- worker processes -----------------------------------------------------------------------

    @contextlib.contextmanager
    def listen(self, queue) -> Iterator[None]:
        """Meanwhile, show what worker processes put on `queue`: their Relay's events and their log
        records (log_to_parent). On leaving, once the workers have ended, what they left is shown."""
        stop = threading.Event()
        thread = threading.Thread(target=self._receive, args=(queue, stop), daemon=True, name="progress-relay")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=10)  # a worker killed while writing must not hold this process

    def _receive(self, queue, stop: threading.Event) -> None:
        while True:
            try:
                item = queue.get(timeout=0.2)
            except queues.Empty:
                if stop.is_set():
                    return
                continue
            try:
                if isinstance(item, logging.LogRecord):
                    logging.getLogger(item.name).handle(item)  # the record passed the worker's level
                else:
                    event, args = item
                    getattr(self, event)(*args)
            except Exception as exc:  # the display must not stop showing the workers' lines
                log.warning("progress display: %s: %s", type(exc).__name__, exc)


def _row(number: int, now: dict):
    """One running trial's row: `trial 7: stage 2 mnist ━━━━━━━━━━ epoch 3 of 4 val accuracy ...`."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    row = Table.grid(padding=(0, 1))
    where = f"trial {number}: stage {now.get('stage', 1)} {now.get('dataset', '')}".rstrip()
    epochs = now.get("epochs") or 1
    done = now.get("epoch", 0)
    extra = f"val accuracy {now['accuracy']:.3f}, local TPE {now['tpe']:.3g}" if "accuracy" in now else ""
    row.add_row(
        Text(where), ProgressBar(total=epochs, completed=done, width=20), Text(f"epoch {done} of {epochs}"), Text(extra)
    )
    return row


class Relay:
    """A worker process's progress while its parent process draws the display: each event goes to
    the parent's StudyProgress.listen, which owns the terminal. Nothing is drawn or logged here."""

    def __init__(self, queue):
        self.queue = queue

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def trial_started(self, number: int, params: dict) -> None:
        self.queue.put(("trial_started", (number, params)))

    def stage(self, number: int, stage: int, dataset: str, epochs: int) -> None:
        self.queue.put(("stage", (number, stage, dataset, epochs)))

    def epoch(self, number: int, epoch: int, epochs: int, accuracy: float, local_tpe: float) -> None:
        self.queue.put(("epoch", (number, epoch, epochs, accuracy, local_tpe)))

    def trial_ended(self, trial: FrozenTrial, seconds: float | None = None) -> None:
        self.queue.put(("trial_ended", (trial, seconds)))


def log_to_parent(queue, prefix: str, level: int) -> None:
    """This worker process's log records, Python warnings and Optuna's messages go to the parent
    (StudyProgress.listen), which prints them above its display; `prefix` names the worker."""
    handler = logging.handlers.QueueHandler(queue)
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))  # the parent adds time and level
    logging.basicConfig(level=logging.WARNING, handlers=[handler])  # others' INFO stays out, as configure_logging
    logging.getLogger("nkat_search").setLevel(level)
    logging.captureWarnings(True)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


class TrainProgress:
    """`nkat-search train`: a per-epoch bar on a terminal, a log line per epoch otherwise. The
    object is the EpochCallback that fit() calls."""

    def __init__(self, dataset: str, epochs: int, *, stream=None, live: bool | None = None, console=None):
        self.dataset, self.epochs = dataset, epochs
        self.stream = stream if stream is not None else sys.stderr
        self.live = (console is not None or _is_terminal(self.stream)) if live is None else live
        self.console = console
        self._progress: Progress | None = None

    def __enter__(self) -> TrainProgress:
        if self.live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            console = self.console or Console(file=self.stream)
            progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("epochs"),
                TextColumn("{task.fields[scores]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
                **_redirects(console),
            )
            with contextlib.ExitStack() as stack:
                stack.enter_context(_logging_above(console, self.stream))
                self._task = stack.enter_context(progress).add_task(self.dataset, total=self.epochs, scores="")
                self._progress, self._exit = progress, stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._exit.close()
            self._progress = None

    def __call__(self, epoch: int, accuracy: float, local_tpe: float) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task, completed=epoch, scores=f"val accuracy {accuracy:.4f}, local TPE {local_tpe:.4f}"
            )
        else:
            log.info("epoch %d/%d  val accuracy %.4f  local TPE %.4f", epoch, self.epochs, accuracy, local_tpe)
