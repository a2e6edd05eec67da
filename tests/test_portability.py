"""What a Linux machine can prove of Windows: nothing POSIX-only is needed to run a study."""

import subprocess
import sys

from helpers import ROOT

SCRIPT = r"""
import os, sys
sys.modules["fcntl"] = None  # import fcntl now raises ImportError, as on Windows
del os.register_at_fork, os.fork  # Windows has no fork (the stdlib checks os.fork before registering)
from nkat_search.search import space, studies, worker
from nkat_search.search.study_file import load_study
from nkat_search.storage import backends

url = "journal:" + sys.argv[2]
config = load_study(sys.argv[1])
store = backends.open_storage(url)
studies.create_or_resume(store, url, config, 2)
study, config = studies.attach(backends.open_storage(url, create=False), url, None)
w = worker.Worker(study, backends.open_storage(url, create=False), url, config)
assert worker.run_loop(w, lambda t: space.suggest(t, config)["embed_dim"] / 16.0, poll_seconds=0.1) == 0
print(sum(t.state.name == "COMPLETE" for t in study.get_trials()), "fcntl" in sys.modules and sys.modules["fcntl"])
"""


def test_a_two_trial_journal_study_runs_without_fcntl_or_fork_hooks(tiny_study, tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, tiny_study(trials=2), str(tmp_path / "s.journal")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["2", "None"]
