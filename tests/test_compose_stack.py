"""The compose stack for real: images built with no registry, README's flow (`start --workers 0`, then
`up --scale worker=2`) finishing a study through two worker containers, a worker stopped with
`docker stop` mid-trial, the dashboard container's HTTP API, and `report` in a container.

It runs on a private Docker engine (tests/docker_engine.py) with the CPU override file
(deploy/docker/compose.cpu.yml) and the local images of scripts/docker-images.sh. The first run on a
machine builds everything (debootstrap, PyPI's torch into the worker image); later runs reuse the
images kept in .cache/docker. The phases' seconds are printed (pytest -s, or the captured output of a
failure) for docs/clusters.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from docker_engine import private_engine
from helpers import ROOT, wait_for
from pg_server import free_port

pytestmark = [pytest.mark.infra, pytest.mark.slow, pytest.mark.long]

PROJECT = "nkatci"
STUDY = "nkat-compose"
BUDGET = 6
GATE = 1.0  # Local TPE on CIFAR-10 that every smoke model passes, even at chance (1.53 at the least)
PASSWORD = "compose-test-pw"
FILES = ["-f", str(ROOT / "docker-compose.yml"), "-f", str(ROOT / "deploy" / "docker" / "compose.cpu.yml")]


def study_file() -> str:
    """The smoke study, renamed, with a gate every trial passes, so that trials run both stages (long
    enough to stop one mid-trial) and the report has completed trials to retrain."""
    text = (ROOT / "nkat_search" / "studies" / "smoke.toml").read_text()
    text = text.replace('name = "nkat-smoke"', f'name = "{STUDY}"')
    text = re.sub(r"(?m)^gate = .*$", f"gate = {GATE}", text)
    return re.sub(r"(?m)^\[report\]\nepochs = \d+", "[report]\nepochs = 1", text)


class Stack:
    """`docker-compose` on the private engine, with this test's .env and project name."""

    def __init__(self, environ: dict[str, str], tmp) -> None:
        self.pg_port, self.dashboard_port = free_port(), free_port()
        settings = {
            "POSTGRES_USER": "nkat",
            "POSTGRES_PASSWORD": PASSWORD,
            "POSTGRES_DB": "nkat",
            "GPUS_PER_WORKER": "1",
            "NKAT_SEARCH_STUDY": STUDY,
            "BASE_IMAGE": "nkat-python:bookworm",
            "POSTGRES_IMAGE": "nkat-postgres:15",
            "POSTGRES_PORT": str(self.pg_port),
            "DASHBOARD_PORT": str(self.dashboard_port),
        }
        self.env_file = tmp / ".env"
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        # variables of the shell override the env file
        self.environ = {k: v for k, v in environ.items() if k not in settings}
        self.study_path = tmp / "study.toml"
        self.study_path.write_text(study_file())
        self.seconds: dict[str, float] = {}

    def __call__(self, *args: str, timeout: float = 120) -> str:
        argv = ["docker-compose", "-p", PROJECT, "--env-file", str(self.env_file), *FILES, *args]
        done = subprocess.run(argv, env=self.environ, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def down(self) -> str:
        """Containers, network and volumes of the project removed, whatever state they are in: what
        docker-compose said."""
        argv = ["docker-compose", "-p", PROJECT, "--env-file", str(self.env_file), *FILES, "down", "-v", "-t", "5"]
        done = subprocess.run(argv, env=self.environ, capture_output=True, text=True, timeout=180, cwd=ROOT)
        return f"down exited {done.returncode}: {done.stdout.strip()} {done.stderr.strip()}"

    def docker(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(["docker", *args], env=self.environ, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"docker {' '.join(args)}: {done.stderr}"
        return done.stdout

    def timed(self, phase: str, *args: str, timeout: float = 120) -> str:
        started = time.monotonic()
        out = self(*args, timeout=timeout)
        self.seconds[phase] = time.monotonic() - started
        return out

    def url(self) -> str:
        return f"postgresql+psycopg://nkat:{PASSWORD}@127.0.0.1:{self.pg_port}/nkat"

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return optuna.load_study(study_name=STUDY, storage=self.url()).get_trials(deepcopy=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with private_engine() as environ:
        s = Stack(environ, tmp_path_factory.mktemp("compose"))
        try:
            s.down()  # what an interrupted earlier run left in the cached engine (its restart policies revive it)
            started = time.monotonic()
            images = subprocess.run(
                ["bash", "scripts/docker-images.sh"], env=environ, capture_output=True, text=True, timeout=420, cwd=ROOT
            )
            assert images.returncode == 0, images.stdout + images.stderr
            s.seconds["local images"] = time.monotonic() - started
            print(images.stdout.strip())  # the seconds of each step the cache did not spare
            s.timed("compose build", "build", "worker", timeout=600)
            yield s
        finally:
            started = time.monotonic()
            print(s.down())
            s.seconds["teardown"] = time.monotonic() - started
            print("compose stack, seconds per phase:", json.dumps({k: round(v, 1) for k, v in s.seconds.items()}))


def in_first_stage_two_dataset(s: Stack) -> optuna.trial.FrozenTrial | None:
    """A running trial that passed the gate and is training on the first of its three Stage-2
    datasets: it is still running seconds later, when its worker gets SIGTERM (a trial in Stage 1
    may be stopped by the gate in the meantime)."""
    first = "mnist"
    for t in s.trials():
        passed = t.user_attrs.get("cifar10_local_tpe", -1.0) >= GATE
        if t.state == optuna.trial.TrialState.RUNNING and passed and f"{first}_accuracy" not in t.user_attrs:
            return t
    return None


def container_of(s: Stack, owner: str) -> str:
    """The worker container whose hostname (its short id) is the owner's host."""
    host = owner.rpartition(":")[0]
    ids = s("ps", "-q", "worker").split()
    match = [i for i in ids if i.startswith(host)]
    assert match, f"no worker container is {host}: {ids}"
    return match[0]


def test_two_workers_finish_the_study_through_a_stopped_worker(stack):
    s = stack
    mount = f"{s.study_path}:/study.toml:ro"
    s.timed("start", "run", "--rm", "-v", mount, "worker", "nkat-search", "start", "--study", "/study.toml",
            "--trials", str(BUDGET), "--workers", "0")  # fmt: skip
    started = time.monotonic()
    s("up", "-d", "--scale", "worker=2")

    victim = wait_for(lambda: in_first_stage_two_dataset(s), "a trial in its Stage 2", timeout=180)
    container = container_of(s, victim.user_attrs["worker"])
    s.docker("stop", "-t", "30", container)
    stopped = next(t for t in s.trials() if t.number == victim.number)
    assert stopped.state == optuna.trial.TrialState.FAIL
    assert stopped.user_attrs.get("fail_reason") == "interrupted (SIGTERM)"
    s.docker("start", container)

    def finished():
        trials = s.trials()
        done = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
        alive = [t for t in trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)]
        return trials if len(done) >= BUDGET and not alive else None

    trials = wait_for(finished, "the budget finished", timeout=300)
    s.seconds["study"] = time.monotonic() - started
    s.seconds["shortest Stage 2"] = min(
        (t.user_attrs["stage2_seconds"] for t in trials if t.state.name == "COMPLETE"), default=0
    )
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == BUDGET, states
    assert states.count("FAIL") == 1, states
    retried = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert len(retried) == 1 and retried[0].params == victim.params, "the stopped trial was not run again"
    assert retried[0].state.name in ("COMPLETE", "PRUNED")
    hosts = {t.user_attrs["worker"].rpartition(":")[0] for t in trials if t.user_attrs.get("worker")}
    assert len(hosts) == 2, f"trials ran on {hosts}, not on both worker containers"

    # the workers leave once the budget is spent, with status 0
    def exited():
        codes = [s.docker("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", c).split() for c in workers(s)]
        return codes if all(c[0] == "exited" for c in codes) else None

    assert [c[1] for c in wait_for(exited, "the workers exiting", timeout=60)] == ["0", "0"]

    # the dashboard container serves the study from PostgreSQL
    summaries = json.load(urllib.request.urlopen(f"http://127.0.0.1:{s.dashboard_port}/api/studies", timeout=30))
    summary = next(x for x in summaries["study_summaries"] if x["study_name"] == STUDY)
    detail_url = f"http://127.0.0.1:{s.dashboard_port}/api/studies/{summary['study_id']}?after=0"
    detail = json.load(urllib.request.urlopen(detail_url, timeout=30))
    assert len(detail["trials"]) == len(trials)

    # the official result, retrained in a container onto the artifacts volume
    report = 'nkat-search report --out "/artifacts/reports/$NKAT_SEARCH_STUDY"'
    s.timed("report", "run", "--rm", "worker", "sh", "-c", report, timeout=300)
    listing = s("run", "--rm", "--no-deps", "worker", "sh", "-c", "cd /artifacts && find . -type f | sort")
    assert f"./reports/{STUDY}/report.md" in listing.split(), listing
    assert any(line.endswith(".safetensors") for line in listing.split()), listing


def workers(s: Stack) -> list[str]:
    return s("ps", "-q", "worker").split()


def test_an_engine_that_cannot_start_skips_with_its_reason(tmp_path, monkeypatch):
    """Where dockerd cannot run (no privileges, another kernel) the stack is skipped, naming why."""
    fake = tmp_path / "dockerd"
    fake.write_text("#!/bin/sh\necho 'failed to start daemon: operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    before = set(Path("/tmp").glob("nkd-*"))
    # its own data root: the stack's engine on the cached one may be running (module-scoped fixture)
    with pytest.raises(pytest.skip.Exception, match="dockerd cannot run here.*operation not permitted"):
        with private_engine(tmp_path / "engine"):
            pass
    assert set(Path("/tmp").glob("nkd-*")) == before, "the engine's run folder was left behind"
