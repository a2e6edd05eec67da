"""Several worker processes on one host: one per device slot, started by `spawn`, stopped together."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
from collections.abc import Iterator

from .. import configure_logging
from ..config import RuntimeFailure, UsageError
from ..storage import backends, lock
from . import studies
from .hostshare import KINDS, kind_of
from .signals import deferred_signals, install_signal_handlers
from .worker import (
    Worker,
    fail_dead_trials,
    run_worker,
)

log = logging.getLogger("nkat_search")


def _child(
    url: str,
    study_name: str,
    device: str,
    verbose: bool,
    data_root: str | None,
    max_failures: int,
    relay=None,
    siblings: dict[str, int] | None = None,
) -> None:
    if relay is None:
        configure_logging(verbose, tag=f"[{device} pid {os.getpid()}] ")
    else:  # the parent draws the display on the terminal and prints these lines above it
        from ..outputs.progress import log_to_parent

        log_to_parent(relay, f"[{device} pid {os.getpid()}] ", logging.DEBUG if verbose else logging.INFO)
    install_signal_handlers()
    try:
        code = run_worker(
            url, study_name, device, data_root=data_root, max_failures=max_failures, relay=relay, siblings=siblings
        )
    except KeyboardInterrupt:
        code = 130
    except (UsageError, RuntimeFailure) as exc:
        log.error("%s", exc)
        code = 2 if isinstance(exc, UsageError) else 1
    raise SystemExit(code)


# How long the parent of `--workers N` waits, after an interrupt, for a worker process to fail and
# queue its trial (a few storage writes) before it kills that process.
CHILD_GRACE_SECONDS = 30


@contextlib.contextmanager
def _display(url: str, study_name: str, ctx) -> Iterator[object]:
    """On a terminal this process draws the one progress display, and the workers send it their
    events and log records through the queue given here; elsewhere (None) each worker logs its
    own plain lines. One owner: several live displays on one terminal overwrite each other."""
    from ..outputs.progress import StudyProgress, on_terminal

    if not on_terminal():
        yield None
        return
    study, _ = studies.attach(backends.open_storage(url, create=False), url, study_name)
    queue = ctx.Queue()
    with StudyProgress(study, counted=lambda t: not studies.is_warm_start(t)) as view, view.listen(queue):
        yield queue


def run_processes(
    url: str,
    study_name: str,
    devices: list[str],
    count: int,
    verbose: bool = False,
    data_root: str | None = None,
    max_failures: int = 3,
) -> int:
    """count worker processes, device i % len(devices) each; the worst exit code of them.

    A terminal's Ctrl-C reaches the parent as well as its workers: the parent handles it like a
    worker does (once; later signals are logged), so that a burst cannot interrupt the clean-up
    below, and SIGTERM cannot end the parent before its workers have ended."""
    install_signal_handlers()
    ctx = multiprocessing.get_context("spawn")
    with _display(url, study_name, ctx) as relay:
        return _run_processes(ctx, relay, url, study_name, devices, count, verbose, data_root, max_failures)


def _run_processes(
    ctx,
    relay,
    url: str,
    study_name: str,
    devices: list[str],
    count: int,
    verbose: bool,
    data_root: str | None,
    max_failures: int,
) -> int:
    slots = [devices[i % len(devices)] for i in range(count)]
    siblings = {kind: sum(kind_of(d) == kind for d in slots) for kind in KINDS}
    procs = [
        ctx.Process(target=_child, args=(url, study_name, d, verbose, data_root, max_failures, relay, siblings))
        for d in slots
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        with deferred_signals():
            for p in procs:
                if p.is_alive():
                    p.terminate()  # SIGTERM on POSIX: the child fails and requeues its trial
            for p in procs:
                p.join(timeout=CHILD_GRACE_SECONDS)
            stuck = [p for p in procs if p.is_alive()]
            for p in stuck:  # never wait for ever on a child that does not end
                log.warning(
                    "worker process %d did not end within %d s of the interrupt; killed", p.pid, CHILD_GRACE_SECONDS
                )
                p.kill()
                p.join()
            if stuck:  # its RUNNING trial: failed with the reason and queued again, as any dead worker's
                store = backends.open_storage(url, create=False)
                study, config = studies.attach(store, url, study_name)
                w = Worker(study, store, url, config)
                with lock.budget_lock(url, study_name):
                    fail_dead_trials(w)
        raise
    codes = [p.exitcode or 0 for p in procs]
    if any(c == 130 for c in codes):
        return 130
    return max(c if c >= 0 else 1 for c in codes)
