"""Worker processes on one host share its CPU cores instead of oversubscribing them.

Every torch process starts with as many intra-op threads as the machine has cores. Two CPU workers
on two cores then run four busy threads that spin-wait on each other: each trial ran 3-5x slower
than alone (docs/performance.md). Here each worker joins a per-host registry when it starts and leaves it
when it ends, however it was started (`start --workers K`, several `nkat-search worker` commands,
compose replicas that mount one registry folder), and before each trial sets torch's threads to
its share of the cores:

    CPU worker:  max(1, (cores - GPU workers - busy elsewhere) // CPU workers), at most `limit`
    GPU worker:  1 (its work runs on the device; its one busy thread launches kernels), and it
                 leaves one core to itself in the CPU workers' share

"Busy elsewhere" is the demand of processes that are not our workers: the 1-minute load average
less the threads our CPU workers run, whole cores only. The registry cannot see other people's
programs, and they matter as much: on this project's 2-core machine, shared with other training,
a smoke-sized fit took 20-25x longer with 2 threads than with 1 (a thread of an OpenMP team waits
for its descheduled teammate at every parallel region), and burnt 30-40x the CPU time.

The registry is a folder of lock files, one per live worker, each held locked (filelock: flock on
POSIX, LockFileEx on Windows) for the worker's lifetime. A process that dies loses its lock with
it, whatever killed it, so a lock that can be taken belongs to nobody: no pid files (a pid is
reused, and is another number in another container's pid namespace) and no fcntl of our own.

torch's inter-op threads are left alone: eager training never uses that pool (only TorchScript's
fork does), and it can be sized only once per process, before first use. OMP_WAIT_POLICY is left
at its default: with a share of one thread there is no OpenMP team to wait in, and PASSIVE would
make a lone worker's two threads sleep and wake at every parallel region.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import filelock
import psutil

log = logging.getLogger("nkat_search")


KINDS = ("cpu", "gpu")


# An unlocked registry file younger than this may be one whose owner is between creating and
# locking it; older ones are left over from a dead worker and are removed.
STALE_SECONDS = 60.0


def host_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS tells, else every core)."""
    try:
        return len(psutil.Process().cpu_affinity())
    except (AttributeError, NotImplementedError, psutil.Error):  # macOS has no affinity
        return psutil.cpu_count() or os.cpu_count() or 1


def default_folder() -> Path:
    """The registry of this user on this host: <temp dir>/nkat-search-<user>/workers."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (a bare container)
        user = str(os.getuid()) if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"nkat-search-{user}" / "workers"


def share_of(
    kind: str, cores: int, cpu_workers: int, gpu_workers: int, busy_elsewhere: int = 0, limit: int | None = None
) -> int:
    """torch intra-op threads for one worker of `kind` among the live workers (itself included),
    with `busy_elsewhere` cores taken by other programs; never more than `limit`."""
    if kind not in KINDS:
        raise ValueError(f"worker kind {kind!r} is unknown; use one of {', '.join(KINDS)}.")
    if kind == "gpu":
        return 1
    share = max(1, (cores - gpu_workers - busy_elsewhere) // max(1, cpu_workers))
    return min(share, limit) if limit else share


def busy_elsewhere(load: float, own_threads: int) -> int:
    """Whole cores of demand from other programs: the load average less our own running threads."""
    return max(0, int(load - own_threads))


def load_average() -> float:
    """The host's 1-minute load average (psutil emulates it on Windows)."""
    return psutil.getloadavg()[0]


def kind_of(device: str) -> str:
    """The registry kind of a torch device string: cpu, or gpu for cuda:N and mps."""
    return "cpu" if device.split(":", 1)[0] == "cpu" else "gpu"


def user_limit() -> int | None:
    """The user's explicit thread limit, OMP_NUM_THREADS (a positive whole number), else None."""
    try:
        value = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return value if value >= 1 else None


class HostShare:
    """One worker's membership of the host's registry; a context manager (join, then leave).

    with HostShare(device) as share:
        while ...:
            share.threads_for_next_trial()
            run the trial
    """

    def __init__(
        self,
        device: str = "cpu",
        folder: str | Path | None = None,
        cores: int | None = None,
        limit: int | None = None,
        load: Callable[[], float] | None = load_average,
        siblings: dict[str, int] | None = None,
    ):
        """limit: the most threads ever (a user's explicit setting, e.g. OMP_NUM_THREADS, read by the
        command line); load: the host's load average, or None to ignore other programs; siblings:
        the workers by kind, this one included, that the same command starts (`start --workers K`).
        Until each of them has joined the registry they are counted as if they had: the first
        worker up would otherwise take every core for its first trial and share them, oversubscribed,
        with the others for the whole of that trial."""
        self.kind = kind_of(device)
        self.folder = Path(folder) if folder is not None else default_folder()
        self.cores = cores or host_cores()
        self.limit, self.load = (limit if limit is not None else user_limit()), load
        self.siblings = dict(siblings or {})
        self._lock: filelock.BaseFileLock | None = None

    def join(self) -> None:
        """Enter the registry: create and lock this worker's file (held until leave or death)."""
        if self._lock is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{self.kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.lock"
        self._lock = filelock.FileLock(self.folder / name)
        self._lock.acquire(timeout=0)

    def leave(self) -> None:
        """Leave the registry: unlock and remove this worker's file."""
        if self._lock is None:
            return
        path = Path(self._lock.lock_file)
        self._lock.release()
        self._lock = None
        path.unlink(missing_ok=True)

    def __enter__(self) -> HostShare:
        self.join()
        return self

    def __exit__(self, *exc) -> None:
        self.leave()

    def live(self) -> dict[str, int]:
        """Live workers on this host by kind, this one included; removes files of dead workers."""
        counts = dict.fromkeys(KINDS, 0)
        for path in self.folder.glob("*.lock"):
            kind = path.name.split("-", 1)[0]
            if kind not in counts:
                continue
            if self._lock is not None and path == Path(self._lock.lock_file):
                counts[kind] += 1
                continue
            try:  # before the probe: opening a lock file truncates it, which renews its mtime
                age = time.time() - path.stat().st_mtime
            except OSError:
                continue
            probe = filelock.FileLock(path)
            try:
                probe.acquire(timeout=0)
            except filelock.Timeout:
                counts[kind] += 1  # held: its worker lives
                continue
            except OSError:  # removed meanwhile, or not ours to open
                continue
            probe.release()
            try:
                if age > STALE_SECONDS:
                    path.unlink()
            except OSError:
                pass  # removed meanwhile, or (Windows) opened by another probe right now
        return counts

    def threads(self) -> int:
        """This worker's share of the cores now (share_of over the live workers and the load)."""
        return self._share(self.live(), self._current())[0]

    @staticmethod
    def _current() -> int:
        import torch

        return torch.get_num_threads()

    def _share(self, live: dict[str, int], current: int) -> tuple[int, int, dict[str, int]]:
        """(threads, cores busy elsewhere, the workers counted by kind)."""
        if self._lock is None:  # asked before joining: count this process as if it had joined
            live = {**live, self.kind: live[self.kind] + 1}
        if self.siblings:
            if all(live[kind] >= count for kind, count in self.siblings.items()):
                self.siblings = {}  # all of them have joined: from now on the registry alone counts
            else:
                live = {kind: max(n, self.siblings.get(kind, 0)) for kind, n in live.items()}
        # Our CPU workers run about `current` threads each (their share is the same rule's).
        elsewhere = busy_elsewhere(self.load(), live["cpu"] * current) if self.load and self.kind == "cpu" else 0
        return share_of(self.kind, self.cores, live["cpu"], live["gpu"], elsewhere, self.limit), elsewhere, live

    def threads_for_next_trial(self) -> int:
        """Set torch's intra-op threads to this worker's share; call before each trial. Returns it."""
        import torch

        current = torch.get_num_threads()
        threads, elsewhere, live = self._share(self.live(), current)
        if current != threads:
            log.info(
                "torch threads for the next trial: %d (%d cores; %d CPU and %d GPU workers on this host, "
                "those still starting counted; %d cores busy with other programs)",
                threads,
                self.cores,
                live["cpu"],
                live["gpu"],
                elsewhere,
            )
            torch.set_num_threads(threads)
        return threads
