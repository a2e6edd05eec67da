"""Signs of life of a running trial: its heartbeat thread, whether a process of this host is alive,
and the grace period after which a silent trial is taken for dead (search/worker.py fails it)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from ..storage import urls

log = logging.getLogger("nkat_search")


def grace_seconds(storage) -> float:
    """How long a RUNNING trial may go without a sign of life before it is taken for dead."""
    return float(getattr(storage, "grace_period", None) or urls.heartbeat_settings()[1])


@contextlib.contextmanager
def heartbeat(storage, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat every interval while it runs (RDB storages; no-op otherwise)."""
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                storage.record_heartbeat(trial_id)
            except Exception as exc:  # past the retry bound; the main thread stops on its next storage call
                log.warning("heartbeat of trial id %d failed: %s", trial_id, str(exc).splitlines()[0][:200])

    thread = threading.Thread(target=beat, daemon=True, name="heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def alive(pid: int) -> bool:
    """Whether a process of this host is running (psutil: os.kill(pid, 0) would end it on Windows)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
