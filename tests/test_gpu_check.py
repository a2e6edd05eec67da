"""scripts/gpu-check.sh on the CPU in its tiny configuration: every stage runs, the project is
installed beside this environment's torch without changing it, and every figure lands in one JSON."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT

STAGES = [
    "env",
    "install",
    "tests",
    "train",
    "train_eager",
    "bench128",
    "bench",
    "round2",
    "ops",
    "procs",
    "search",
    "status",
]


@pytest.mark.slow
def test_gpu_check_runs_every_stage_on_the_cpu_and_writes_one_json(tmp_path, tiny_study) -> None:
    # The wheel of the project, as scripts/gpu-wheels.sh leaves it in wheels/; everything else the
    # install needs is already in this environment, which the script's venv sees (as the GPU
    # machine's preinstalled torch). Built from a copy: an in-tree build leaves build/ behind.
    src, wheels = tmp_path / "src", tmp_path / "wheels"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "nkat_search", src / "nkat_search", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(src)], check=True)

    out = tmp_path / "out" / "gpu-check.json"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "NKAT_SEARCH_STORAGE")}
    env["NKAT_GPU_CHECK_STUDY"] = tiny_study(name="gpu-check", trials=2)  # smoke's trials take minutes on 2 busy cores
    done = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "gpu-check.sh"),
            "--device",
            "cpu",
            "--tiny",
            "--python",
            sys.executable,
            "--wheels",
            str(wheels),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=1500,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    stages = report["stages"]
    assert list(stages) == STAGES
    assert report["ok"], {name: s.get("stderr_tail") for name, s in stages.items() if not s["ok"]}
    for name, stage in stages.items():
        assert stage["seconds"] <= stage["limit_s"] + 20, name
        assert (out.parent / "gpu-check-logs" / f"{name}.out").exists(), name

    assert stages["env"]["result"]["torch"] == __import__("torch").__version__
    install = stages["install"]
    assert install["mode"] == "resolved" and install["torch_unchanged"] is True
    assert install["kept"]["torch"]["after"] == importlib.metadata.version("torch")
    assert any(p.startswith("nkat-search==") for p in install["added"])

    summary = stages["tests"]["summary"]
    assert summary["tests"] > 0 and summary["failures"] == summary["errors"] == 0

    train = stages["train"]["result"]
    assert train["device"] == "cpu" and train["dataset"] == "cifar10" and train["epochs"] == 1
    assert 0.0 <= train["accuracy"] <= 1.0 and train["images_per_second"] > 0
    assert stages["train"]["stage1_estimate_s"] == pytest.approx(450_000 / train["images_per_second"], rel=1e-3)

    same = stages["train"]["graphs_vs_eager"]  # graphs auto beside graphs off: on a CPU both run eagerly
    assert (same["graphs"], same["eager"]) == ("off (auto: eager on cpu)", "off")
    assert same["losses"] == same["eager_losses"] and same["max_relative_loss_difference"] == 0.0
    assert same["same_losses_within_bf16"] is True and same["speedup"] > 0

    assert stages["bench"]["result"]["train"]  # the bench's JSON object, as `bench --json` prints it
    assert stages["bench128"]["result"]["config"]["batch_size"] == 128 and stages["bench128"]["result"]["train"]
    round2 = stages["round2"]["result"]["round2"]
    assert [r["dataset"] for r in round2["rows"]] == ["cifar10", "mnist", "fashion_mnist", "emnist_letters"]
    assert round2["projected_search_seconds"] > 0
    assert [r["processes"] for r in stages["procs"]["result"]["procs"]["rows"]] == [1, 2]
    ops = {(r["recipe"], r["part"]): r for r in stages["ops"]["result"]["ops"]["rows"]}
    assert ops[("research", "step")]["same_ops"] and min(ops[("research", "augment")]["ops"]) > 0

    status = stages["status"]["result"]
    assert status["finished"] == status["budget"] == stages["search"]["trials"] == 2
    assert status["states"]["RUNNING"] == 0
