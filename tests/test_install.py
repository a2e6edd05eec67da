"""Installing nkat-search into an environment of one's own: pip keeps the torch that is there, the
wheel carries the packaged study files, and the dependency ranges agree with the pinned files."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
FLOORED = ("torch", "torchvision", "optuna", "optuna-dashboard")


def pins(path: Path) -> dict[str, str]:
    """{canonical name: version} of the name==version lines of a constraints file."""
    lines = (ln.split("#")[0].strip() for ln in path.read_text().splitlines())
    return {canonicalize_name(n): v for n, v in (ln.split("==") for ln in lines if ln)}


def requirements() -> dict[str, Requirement]:
    reqs = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["test"]
    return {canonicalize_name(r.name): r for r in map(Requirement, reqs)}


def test_dependencies_are_ranges_and_the_floors_are_what_ci_tests_at_the_bottom() -> None:
    reqs = requirements()
    assert not [str(r) for r in reqs.values() if any(s.operator == "==" for s in r.specifier)], (
        "exact pins belong in constraints/ci.txt"
    )
    oldest = pins(ROOT / "constraints" / "min.txt")
    for name in ("optuna", "optuna-dashboard"):
        (floor,) = [s.version for s in reqs[name].specifier if s.operator == ">="]
        assert Version(oldest[name]) == Version(floor), (
            f"constraints/min.txt tests {name} {oldest[name]}, pyproject admits {floor}"
        )
    for name in FLOORED:
        assert any(s.operator == ">=" for s in reqs[name].specifier), name


def test_ci_pins_every_dependency_inside_its_range() -> None:
    ci = pins(ROOT / "constraints" / "ci.txt")
    for name, req in requirements().items():
        assert name in ci, f"constraints/ci.txt does not pin {name}"
        assert req.specifier.contains(ci[name], prereleases=True), f"{name}=={ci[name]} is outside {req}"


def dependency_closure(names: tuple[str, ...]) -> list[md.Distribution]:
    """The installed distributions of names and everything they require on this platform, extras
    included (torch asks for cuda-toolkit[cublas,...], whose extras bring the nvidia packages)."""
    seen: dict[str, md.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo = [(name, "") for name in names]
    while todo:
        name, extra = todo.pop()
        name = canonicalize_name(name)
        if (name, extra) in done:
            continue
        done.add((name, extra))
        dist = seen.setdefault(name, md.distribution(name))
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(req.name, "")] + [(req.name, e) for e in req.extras]
    return list(seen.values())


def torch_only_site(target: Path) -> Path:
    """A folder holding (as symlinks) the torch and torchvision of this environment and what
    they need, nothing else: the stand-in for a user's environment with its own torch."""
    target.mkdir()
    for dist in dependency_closure(("torch", "torchvision")):
        for top in {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (target / top).exists():
                (target / top).symlink_to(source)
    return target


def freeze(python: Path) -> dict[str, str]:
    out = subprocess.run(
        [str(python), "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True
    ).stdout
    return {canonicalize_name(n): v for n, v in re.findall(r"^([A-Za-z0-9._-]+)==(\S+)$", out, re.MULTILINE)}


@pytest.mark.slow
def test_pip_install_into_an_environment_with_torch_keeps_that_torch_and_ships_the_studies(tmp_path) -> None:
    # A fresh venv that sees a torch-only site after its own, as `python -m venv --system-site-packages`
    # sees a system Python's packages (a venv cannot be the base of another venv).
    base = torch_only_site(tmp_path / "base-site")
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    own_site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (own_site / "user-environment.pth").write_text(f"{base}\n")
    before = freeze(python)
    assert before["torch"] == md.version("torch") and before["torchvision"] == md.version("torchvision")
    assert "optuna" not in before

    # Build from a copy of the checkout: an in-tree build would leave build/ in the repository.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "nkat_search", src / "nkat_search", ignore=shutil.ignore_patterns("__pycache__"))

    wheels = tmp_path / "wheels"
    subprocess.run([str(python), "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(src)], check=True)
    (wheel,) = wheels.glob("nkat_search-*.whl")
    assert {"nkat_search/studies/round2.toml", "nkat_search/studies/smoke.toml"} <= set(
        zipfile.ZipFile(wheel).namelist()
    )

    # --no-compile: byte-compiling plotly's thousands of modules is most of an install's time.
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-compile", str(src)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    after = freeze(python)
    assert (after["torch"], after["torchvision"]) == (before["torch"], before["torchvision"])
    installed = re.search(r"^Successfully installed (.*)$", done.stdout, re.MULTILINE).group(1).split()
    assert not [p for p in installed if p.startswith(("torch-", "torchvision-", "nvidia", "triton-"))], installed
    assert not list(own_site.glob("torch*")), "pip put a second torch into the environment"
    version = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('nkat-search'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert version == PYPROJECT["project"]["version"]

    # From an empty folder (no checkout, no study files beside it) the packaged studies are there,
    # as a new user meets them: no settings of ours in the environment, one torch thread.
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("NKAT_SEARCH_")}
    env["OMP_NUM_THREADS"] = "1"

    def nkat(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(env_dir / "bin" / "nkat-search"), *args],
            cwd=empty,
            capture_output=True,
            text=True,
            env={**env, **extra},
            timeout=300,
        )

    def one_sentence(done: subprocess.CompletedProcess) -> str:
        assert done.returncode == 2, done.stdout + done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        return done.stderr

    listed = nkat("studies")
    assert listed.returncode == 0, listed.stderr
    assert {line.split()[0] for line in listed.stdout.splitlines() if line.strip()} >= {"round2", "smoke"}
    assert list(empty.iterdir()) == []

    copied = nkat("studies", "--copy", "round2", "my.toml")
    assert copied.returncode == 0, copied.stderr
    assert (empty / "my.toml").read_bytes() == (own_site / "nkat_search" / "studies" / "round2.toml").read_bytes()
    assert "my.toml already exists" in one_sentence(nkat("studies", "--copy", "round2", "my.toml"))

    # A packaged study by name runs (smoke: synthetic data, nothing to download).
    journal = tmp_path / "smoke.journal"
    ran = nkat("start", "--study", "smoke", "--trials", "2", "--storage", f"journal:{journal}")
    assert ran.returncode == 0, ran.stderr
    shown = nkat("status", "--json", "--storage", f"journal:{journal}")
    assert shown.returncode == 0, shown.stderr
    counts = json.loads(shown.stdout)
    assert (counts["budget"], counts["finished"], counts["states"]["RUNNING"]) == (2, 2, 0), counts

    # No --study means Round 2, whose Stage 1 needs CIFAR-10 from torchvision. With every download
    # sent to a closed port, start stops before it writes the default journal into the folder.
    closed = "http://127.0.0.1:9"
    refused = nkat(
        "start",
        "--trials",
        "50",
        "--workers",
        "0",
        HTTP_PROXY=closed,
        HTTPS_PROXY=closed,
        http_proxy=closed,
        https_proxy=closed,
        NO_PROXY="",
        no_proxy="",
    )
    assert "cifar10" in one_sentence(refused)
    assert not list(empty.glob("*.journal*")), sorted(p.name for p in empty.iterdir())
