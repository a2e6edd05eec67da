"""hostshare: workers on one host divide its cores; the registry counts live workers only, across
processes, and forgets dead ones whatever killed them."""

import os
import subprocess
import sys
import time

import pytest
import torch

from nkat_search.search import hostshare
from nkat_search.search.hostshare import HostShare, busy_elsewhere, share_of

QUIET = None  # no load average: the tests count our workers only, whatever else this machine runs

# A worker in another process: joins the registry, says so, and lives until killed.
MEMBER = """
import sys, time
from nkat_search.search.hostshare import HostShare
share = HostShare(sys.argv[2], folder=sys.argv[1], cores=4)
share.join()
print("joined", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize(
    "kind, cores, cpu, gpu, threads",
    [
        ("cpu", 2, 1, 0, 2),  # alone: every core
        ("cpu", 2, 2, 0, 1),
        ("cpu", 2, 3, 0, 1),  # never below one thread
        ("cpu", 16, 3, 0, 5),
        ("cpu", 16, 2, 4, 6),  # each GPU worker keeps one core busy launching kernels
        ("cpu", 2, 1, 4, 1),
        ("gpu", 16, 0, 4, 1),
    ],
)
def test_share_of_the_cores(kind, cores, cpu, gpu, threads):
    assert share_of(kind, cores, cpu, gpu) == threads


@pytest.mark.parametrize(
    "cores, cpu, elsewhere, limit, threads",
    [
        (2, 1, 0, None, 2),
        (2, 1, 1, None, 1),  # another program keeps a core busy
        (2, 1, 13, None, 1),  # a machine swamped by others: one thread, never a team that waits
        (16, 2, 4, None, 6),
        (16, 1, 0, 4, 4),  # the user's limit (e.g. OMP_NUM_THREADS) wins
        (2, 1, 0, 1, 1),
    ],
)
def test_other_programs_and_the_users_limit_lower_the_share(cores, cpu, elsewhere, limit, threads):
    assert share_of("cpu", cores, cpu, 0, elsewhere, limit) == threads


@pytest.mark.parametrize("load, own, elsewhere", [(2.0, 2, 0), (2.9, 2, 0), (3.1, 2, 1), (15.4, 1, 14), (0.3, 2, 0)])
def test_demand_elsewhere_is_the_load_less_our_threads_in_whole_cores(load, own, elsewhere):
    assert busy_elsewhere(load, own) == elsewhere


@pytest.fixture(autouse=True)
def _no_user_limit(monkeypatch):
    """The shares below are computed without a user's OMP_NUM_THREADS (the suite may run under one)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_a_busy_machine_gets_one_thread_and_a_quiet_one_its_share(tmp_path):
    load = [0.5]
    before = torch.get_num_threads()
    try:
        with HostShare("cpu", folder=tmp_path, cores=2, load=lambda: load[0]) as share:
            torch.set_num_threads(2)
            assert share.threads_for_next_trial() == 2
            load[0] = 12.0  # other people's training arrives
            assert share.threads_for_next_trial() == 1
            load[0] = 1.2  # they left; our one thread is most of the load
            assert share.threads_for_next_trial() == 2
    finally:
        torch.set_num_threads(before)


def test_devices_map_to_kinds():
    assert [hostshare.kind_of(d) for d in ("cpu", "cuda", "cuda:1", "mps")] == ["cpu", "gpu", "gpu", "gpu"]


def test_workers_in_one_folder_count_each_other_and_leave(tmp_path):
    a, b = HostShare("cpu", folder=tmp_path, cores=4, load=QUIET), HostShare("cuda:0", folder=tmp_path, cores=4)
    assert a.threads() == 4  # not joined yet: counts itself as if it had
    with a:
        assert a.live() == {"cpu": 1, "gpu": 0} and a.threads() == 4
        with b:
            assert a.live() == {"cpu": 1, "gpu": 1}
            assert (a.threads(), b.threads()) == (3, 1)
        assert a.live() == {"cpu": 1, "gpu": 0}
    assert not list(tmp_path.iterdir())


def test_siblings_of_one_command_count_before_they_join(tmp_path):
    # `start --workers 2` on 2 cores: the first worker up must not take both cores for its first
    # trial while its sibling is still starting (measured: that trial ran 3x longer, oversubscribed).
    first = HostShare("cpu", folder=tmp_path, cores=2, load=QUIET, siblings={"cpu": 2, "gpu": 0})
    with first:
        assert first.threads() == 1  # alone in the registry, its sibling counted anyway
        with HostShare("cpu", folder=tmp_path, cores=2, load=QUIET, siblings={"cpu": 2, "gpu": 0}) as second:
            assert (first.threads(), second.threads()) == (1, 1)
        assert first.threads() == 2  # both had joined: the registry alone counts, the sibling has left
    gpu_first = HostShare("cpu", folder=tmp_path, cores=4, load=QUIET, siblings={"cpu": 1, "gpu": 1})
    with gpu_first:
        assert gpu_first.threads() == 3  # the GPU sibling's launching core is kept free from the start


def test_threads_for_next_trial_sets_torch_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        with HostShare("cpu", folder=tmp_path, cores=3, load=QUIET) as share:
            assert share.threads_for_next_trial() == 3 and torch.get_num_threads() == 3
            with HostShare("cpu", folder=tmp_path, cores=3):
                assert share.threads_for_next_trial() == 1 and torch.get_num_threads() == 1
            assert share.threads_for_next_trial() == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def _member(folder, kind="cpu") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", MEMBER, str(folder), kind], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "joined"
    return proc


def test_a_worker_in_another_process_counts_until_it_is_killed(tmp_path):
    share = HostShare("cpu", folder=tmp_path, cores=4, load=QUIET)
    proc = _member(tmp_path)
    try:
        assert share.live() == {"cpu": 1, "gpu": 0} and share.threads() == 2
    finally:
        proc.kill()  # SIGKILL: no clean-up of its own; the kernel releases its lock
        proc.wait()
    assert share.live() == {"cpu": 0, "gpu": 0} and share.threads() == 4


def test_files_of_dead_workers_are_removed_once_old(tmp_path):
    proc = _member(tmp_path, "gpu")
    proc.kill()
    proc.wait()
    (left,) = tmp_path.glob("gpu-*.lock")
    share = HostShare("cpu", folder=tmp_path, cores=4)
    assert share.live()["gpu"] == 0 and left.exists()  # young: perhaps a worker between creating and locking
    old = time.time() - 2 * hostshare.STALE_SECONDS
    os.utime(left, (old, old))
    assert share.live()["gpu"] == 0 and not left.exists()


def test_other_files_in_the_folder_are_ignored(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "tpu-1.lock").write_text("")
    assert HostShare("cpu", folder=tmp_path).live() == {"cpu": 0, "gpu": 0}


def test_the_default_registry_is_per_user_under_the_temp_folder():
    folder = hostshare.default_folder()
    assert folder.name == "workers" and folder.parent.name.startswith("nkat-search-")
    assert hostshare.host_cores() >= 1


def test_omp_num_threads_caps_the_share(tmp_path, monkeypatch):
    # A user's OMP_NUM_THREADS is an explicit limit: the share never raises torch above it.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert HostShare("cpu", folder=tmp_path, cores=4, load=QUIET).limit == 1
    with HostShare("cpu", folder=tmp_path, cores=4, load=QUIET) as share:
        assert share._share(share.live(), 1)[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert HostShare("cpu", folder=tmp_path, cores=4, load=QUIET).limit is None
