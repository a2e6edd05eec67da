"""How a worker process takes SIGTERM (docker stop, Slurm, Kubernetes) and SIGINT (Ctrl-C): once,
as an Interrupted raised in the main thread outside database code, so that the clean-up (fail the
trial, queue its retry) always finishes."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger("nkat_search")


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived while a trial ran."""


class _Flag:
    """Whether an interrupt is being handled. Not threading.Event: its set() holds a lock that is
    not reentrant, so a second Ctrl-C landing inside the first handler's set() deadlocked the
    process (seen in a burst of Ctrl-C on a loaded machine). Handlers and their readers all run in
    the main thread, so a plain attribute is enough."""

    value = False

    def set(self) -> None:
        self.value = True

    def clear(self) -> None:
        self.value = False

    def is_set(self) -> bool:
        return self.value


_interrupted = _Flag()


# Code that an exception raised in its midst can leave broken. SQLAlchemy took a transaction for
# ended before the driver committed it (the pooled connection goes back inside it), or a ping's
# clean-up raises in place of the interrupt; either way the clean-up's storage calls fail. Optuna's
# journal storage counts a log line as read before it applies it to the process's copy of the
# study: a trial whose COMPLETE is in the file stays RUNNING in that copy, and the clean-up queues
# a finished trial again.
DATABASE_MODULES = ("sqlalchemy", "psycopg", "pymysql", "MySQLdb", "optuna.storages.journal")


def in_database(frame) -> bool:
    """Whether the stack of `frame` runs SQLAlchemy's, a database driver's or the journal storage's code."""
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if any(name == m or name.startswith(m + ".") for m in DATABASE_MODULES):
            return True
        frame = frame.f_back
    return False


def install_signal_handlers() -> None:
    """SIGTERM (docker stop, Slurm, Kubernetes) and SIGINT (Ctrl-C) raise Interrupted in the main
    thread, once: later signals while the first is being handled are logged and ignored, so the
    clean-up (fail the trial, queue its retry) always finishes. A signal that arrives inside
    SQLAlchemy, the driver or the journal storage is raised again 50 ms later, until it lands
    outside them (a storage call takes milliseconds). SIGTERM where the platform has it."""
    _interrupted.clear()

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if _interrupted.is_set():
            log.warning("%s again: finishing the clean-up first", name)
            return
        if in_database(frame):
            again = threading.Timer(0.05, signal.raise_signal, (signum,))
            again.daemon = True
            again.start()
            return
        _interrupted.set()
        raise Interrupted(name)

    for sig in (getattr(signal, "SIGTERM", None), signal.SIGINT):
        if sig is not None:
            signal.signal(sig, handler)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Within: an interrupt no longer raises (it is the clean-up of one)."""
    _interrupted.set()
    yield
