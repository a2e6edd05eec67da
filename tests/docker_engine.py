"""A private Docker engine for tests/test_compose_stack.py: `dockerd` started by the test with its own
data root, exec root, socket and pid file, and stopped by its pid whatever happens.

Its data root is kept in .cache/docker/engine (git-ignored): the images built there (the local Debian
base, PostgreSQL, the worker image) are reused by the next run on this machine. The engine runs
without the default bridge (`--bridge=none`), so that it does not take over docker0 from another
engine on the host: containers talk over the compose project's own network, and builds use the host's
network (deploy/docker/compose.cpu.yml). It keeps its iptables rules: a host that bridges through
netfilter with a FORWARD policy of DROP (as an engine leaves it) drops that network's traffic without them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import ROOT, unavailable

CACHE = ROOT / ".cache" / "docker"


def _cannot_run() -> None:
    """Skips (CI or not) where no engine can run: not root, not Linux. A tool the test command
    installs that is missing fails under CI instead (helpers.unavailable)."""
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("a private Docker engine needs root on Linux (dockerd, debootstrap)")


def _missing() -> str | None:
    tools = {
        "dockerd": "docker.io",
        "docker": "docker.io",
        "docker-compose": "docker-compose",
        "debootstrap": "debootstrap",
    }
    lacking = sorted({package for tool, package in tools.items() if shutil.which(tool, path=_path()) is None})
    if lacking:
        return f"Docker engine tools missing (apt-get install -y {' '.join(lacking)})"
    return None


def _path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


@contextmanager
def private_engine(data: Path = CACHE / "engine") -> Iterator[dict[str, str]]:
    """Starts dockerd on the data root `data` and yields the environment (PATH, DOCKER_HOST) that
    talks to it; stops it after."""
    _cannot_run()
    reason = _missing()
    if reason:
        unavailable(reason)
    # unix socket paths are limited to 108 bytes: the socket lives in a short folder under /tmp
    run = Path(tempfile.mkdtemp(prefix="nkd-", dir="/tmp"))
    data.mkdir(parents=True, exist_ok=True)
    _stop_orphans(data)
    log_path = run / "dockerd.log"
    environ = {**os.environ, "PATH": _path(), "DOCKER_HOST": f"unix://{run}/docker.sock"}
    argv = [
        "dockerd",
        f"--data-root={data}",
        f"--exec-root={run}/exec",
        f"--pidfile={run}/docker.pid",
        f"--host={environ['DOCKER_HOST']}",
        "--bridge=none",
    ]
    with open(log_path, "wb") as log:
        engine = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=environ, start_new_session=True)
    try:
        _wait_until_up(engine, environ, log_path)
        yield environ
    finally:
        _stop(engine)
        _unmount_below(run)
        shutil.rmtree(run, ignore_errors=True)


def _wait_until_up(engine: subprocess.Popen, environ: dict[str, str], log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if engine.poll() is not None:  # no privileges, a kernel without overlay or cgroups: skipped, even in CI
            pytest.skip(f"dockerd cannot run here: it exited ({engine.returncode}): {log_path.read_text()[-600:]}")
        probe = subprocess.run(["docker", "version"], env=environ, capture_output=True, timeout=30)
        if probe.returncode == 0:
            return
        time.sleep(0.5)
    pytest.skip(f"dockerd cannot run here: no answer within 60 s: {log_path.read_text()[-600:]}")


def _stop_orphans(data: Path) -> None:
    """Stops an engine on this data root that an earlier run left behind (its pytest killed with
    SIGKILL): two engines on one data root would share its containers' state."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:  # the process ended meanwhile
            continue
        if argv and argv[0].endswith(b"dockerd") and f"--data-root={data}".encode() in argv:
            orphan = int(cmdline.parent.name)
            os.kill(orphan, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while Path(f"/proc/{orphan}").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            for arg in argv:  # its run folder: the parent of its exec root
                if arg.startswith(b"--exec-root=/tmp/nkd-"):
                    run = Path(arg.split(b"=", 1)[1].decode()).parent
                    _unmount_below(run)
                    shutil.rmtree(run, ignore_errors=True)


def _unmount_below(folder: Path) -> None:
    """The engine leaves its default network namespace mounted in its exec root when it exits."""
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(f"{folder}/")]
    for point in sorted(points, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


def _stop(engine: subprocess.Popen) -> None:
    """SIGTERM, as `systemctl stop docker` does; the engine stops its containers and containerd."""
    if engine.poll() is None:
        engine.send_signal(signal.SIGTERM)
        try:
            engine.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(engine.pid, signal.SIGKILL)
            engine.wait(timeout=30)
