"""bench: every section runs with tiny settings and reports figures with their precision; the
research-style reference (benchmarks/) computes the same function as our model and is optional;
the options are one typed object whose fields are the command's flags."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import INTERRUPTED, child_signals

from nkat_search import devices, train
from nkat_search.bench import (
    concurrent,
    ops,
    options,
    search,
    steps,
    storage,
    tables,
    timing,
)
from nkat_search.cli import main as cli
from nkat_search.config import DataConfig, ModelConfig, TrainConfig, UsageError
from nkat_search.data.loader import load_splits
from nkat_search.model import NKATViT, nucleus_mask

TINY = ModelConfig(embed_dim=32, depth=2, num_heads=4)


@pytest.fixture(scope="module")
def splits():
    return timing.synthetic_splits("cifar10", 64, 32, torch.device("cpu"))


@pytest.fixture(scope="module")
def reference():
    # The checkout's copy, also where the tests run against an installed package (the GPU check).
    module = timing.research_pipeline(str(Path(__file__).resolve().parents[1] / "benchmarks" / "research_pipeline.py"))
    return module


def test_research_filter_keeps_the_same_keys_as_nucleus_mask(reference):
    torch.manual_seed(0)
    logits = torch.randn(4, 8, 17, 17) * 3
    for top_k, top_p in [(6, 0.8), (0, 0.8), (6, 1.0), (3, 0.5), (17, 0.95)]:
        kept = torch.isfinite(reference.research_filter(logits, top_k, top_p))
        assert torch.equal(kept, nucleus_mask(logits, top_k, top_p)), (top_k, top_p)


@pytest.mark.parametrize(
    "kwargs", [{}, {"split_heads": True}, {"nkat_strength": 2.0}, {"top_k": 0, "top_p": 1.0, "nkat_strength": 0.0}]
)
def test_research_model_computes_the_same_function(reference, kwargs):
    # Our model folds the modulation into the logits and computes only the class token in its
    # last block; the reference does neither. Same weights must give the same outputs.
    cfg = ModelConfig(embed_dim=32, depth=2, num_heads=4, **kwargs)
    ours = NKATViT(cfg).eval()
    for block in ours.blocks:
        if block.attn.theta is not None:
            torch.nn.init.normal_(block.attn.theta.weight, std=1.0)
    research = reference.research_model(cfg).eval()
    research.load_state_dict(ours.state_dict())
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(ours(x), research(x))


def test_without_a_checkout_the_reference_is_reported_missing(monkeypatch, tmp_path):
    timing.research_pipeline.cache_clear()
    monkeypatch.setattr(timing, "__file__", str(tmp_path / "site-packages" / "nkat_search" / "bench" / "timing.py"))
    monkeypatch.chdir(tmp_path)
    try:
        assert timing.research_pipeline() is None
        with pytest.raises(UsageError, match="--reference"):
            timing.research_pipeline(str(tmp_path / "nowhere.py"))
    finally:
        timing.research_pipeline.cache_clear()


def test_fit_trains_through_train_step(monkeypatch):
    calls = []
    original = train.TrainStep.__call__

    def counting(self, images, targets):
        calls.append(len(images))
        return original(self, images, targets)

    monkeypatch.setattr(train.TrainStep, "__call__", counting)
    splits = load_splits("cifar10", DataConfig(source="synthetic", val_size=16, synthetic_train=80, synthetic_test=8))
    result = train.fit(TINY, TrainConfig(epochs=1, warmup=0, batch_size=16, limit_train=3), splits)
    assert calls == [16, 16, 16] and result.images_per_second > 0


@pytest.mark.parametrize("native", [(), ("avx512_bf16",)])
def test_train_figures_side_by_side_with_their_precision(splits, reference, monkeypatch, native):
    monkeypatch.setattr(devices, "cpu_bf16_flags", lambda: native)
    out = steps.bench_train(
        TINY, TrainConfig(batch_size=16, precision="fp32"), splits, steps=1, warmup=1, repeats=1, reference=reference
    )
    expected = {"real", "bare", "research"} | ({"real_bf16"} if native else set())
    assert set(out["variants"]) == expected
    precisions = {name: figure["precision"] for name, figure in out["variants"].items()}
    assert precisions == {
        "real": "float32",
        "bare": "float32",
        "research": "float32",
        **({"real_bf16": "bfloat16"} if native else {}),
    }
    assert all(figure["img_per_s"] > 0 for figure in out["variants"].values())
    assert out["real_over_bare_cost"] > 0 and out["real_over_research_speed"] > 0
    assert out["memory"]["kind"] == "cpu_peak_rss" and out["memory"]["mib"] > 0
    assert out["graphs"] == "off (auto: eager on cpu)"  # real_graphed runs where graphs capture: CUDA


def test_a_bf16_real_step_is_also_shown_at_fp32_beside_the_fp32_research(splits, reference):
    out = steps.bench_train(
        TINY, TrainConfig(batch_size=16, precision="bf16"), splits, steps=1, warmup=0, repeats=1, reference=reference
    )
    v = out["variants"]
    assert (v["real"]["precision"], v["real_fp32"]["precision"], v["research"]["precision"]) == (
        "bfloat16",
        "float32",
        "float32",
    )
    assert out["real_fp32_over_research_speed"] > 0


def test_without_the_reference_the_train_and_augment_figures_say_so(splits):
    out = steps.bench_train(TINY, TrainConfig(batch_size=16, precision="fp32"), splits, steps=1, warmup=0, repeats=1)
    assert "research" not in out["variants"] and "real_over_research_speed" not in out
    assert out["research"] == timing.NO_REFERENCE
    aug = steps.bench_augment(splits, TrainConfig(), batch=32, images=64, repeats=1)
    assert aug["pil"] == timing.NO_REFERENCE and "speedup" not in aug
    assert "reference pipeline not available" in tables.table(
        {
            "device": "cpu",
            "torch": "x",
            "threads": 1,
            "cpu": {"name": "x", "cores": 2},
            "precision": {"dtype": "float32", "reason": "fp32 asked for"},
            "config": {
                "model": dataclasses.asdict(TINY),
                "batch_size": 16,
                "warmup": 0,
                "repeats": 1,
                "steps": 1,
                "sections": ["train", "augment"],
            },
            "train": out,
            "augment": aug,
        }
    )


def test_augment_and_eval_figures(splits, reference):
    aug = steps.bench_augment(splits, TrainConfig(), batch=32, images=64, repeats=1, reference=reference)
    assert aug["batched"]["img_per_s"] > 0 and aug["pil"]["img_per_s"] > 0 and aug["speedup"] > 0
    ev = steps.bench_eval(TINY, splits, batch=16, repeats=1, precision="fp32")
    assert ev["img_per_s"] > 0 and ev["precision"] == "float32"


def test_storage_latency_on_a_journal(tmp_path):
    out = storage.bench_storage(f"journal:{tmp_path / 'b.journal'}", procs=2, ops=2)
    assert 0 < out["p50_ms"] <= out["p95_ms"] and out["procs"] == 2


def test_peak_memory_is_read_portably():
    assert timing.peak_rss_mib() > 10  # a Python process with torch loaded


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(steps=0), "--steps must be at least 1"),
        (dict(batch_size=0), "--batch-size must be at least 1"),
        (dict(only=("train", "nonsense")), "--only takes sections"),
        (dict(processes=(1, 0)), "--processes takes one or more counts"),
        (dict(warmup=-1), "--warmup must be at least 0"),
        (dict(steps="4"), "steps must be a whole number"),
        (dict(scale=0.0), "--scale must be in"),
        (dict(pass_rate=1.5), "--pass-rate must be in"),
    ],
)
def test_options_refuse_bad_values_with_a_sentence(change, message):
    with pytest.raises(UsageError, match=message):
        options.BenchOptions(**change)


def test_every_option_is_a_flag_and_the_flags_make_the_options():
    parser = cli.build_parser()
    args = parser.parse_args(
        [
            "bench",
            "--steps",
            "2",
            "--only",
            "train",
            "eval",
            "--processes",
            "1",
            "4",
            "--batch-size",
            "8",
            "--compile",
            "--reference",
            "ref.py",
        ]
    )
    opts = options.BenchOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(options.BenchOptions)})
    assert opts == options.BenchOptions(
        steps=2, only=("train", "eval"), processes=(1, 4), batch_size=8, compile=True, reference="ref.py"
    )
    assert parser.parse_args(["bench"]).only == options.SECTIONS
    assert options.BenchOptions(search=True).sections == ("search",)


def test_command_prints_one_json_object_with_the_precision_and_why(capsys):
    args = cli.build_parser().parse_args(
        [
            "bench",
            "--json",
            "--only",
            "eval",
            "--embed-dim",
            "32",
            "--depth",
            "1",
            "--eval-images",
            "16",
            "--images",
            "16",
            "--batch-size",
            "16",
            "--repeats",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["eval"]["img_per_s"] > 0 and result["config"]["batch_size"] == 16
    dtype, reason = devices.choose_precision("auto", torch.device("cpu"))
    assert result["precision"] == {
        "asked": "auto",
        "dtype": str(dtype or torch.float32).removeprefix("torch."),
        "reason": reason,
    }
    assert result["eval"]["precision"] == result["precision"]["dtype"]


@pytest.mark.slow
def test_search_section_splits_every_trial_into_phases_that_add_up(tiny_study):
    out = search.bench_search(tiny_study(trials=2), 2, torch.device("cpu"))
    assert out["trials"] == 2 and len(out["per_trial"]) == 2 and out["trials_per_minute"] > 0
    assert sum(out["phases"].values()) == pytest.approx(out["seconds"], rel=1e-6)
    assert sum(out["cpu_phases"].values()) == pytest.approx(out["cpu_seconds"], rel=1e-6)
    assert {"storage", "dashboard note", "data", "pruner", "worker loop (rest)"} <= set(out["phases"])
    assert {"train steps", "evaluation", "model build", "objective"} <= set(out["phases"])
    for row in out["per_trial"]:
        assert sum(row["phases"].values()) == pytest.approx(row["seconds"], rel=1e-6)
        assert 0 <= row["not_training"] <= 1 and 0 <= row["not_training_cpu"] <= 1
    assert out["storage_calls"] and out["startup"]["import_seconds"] > 0
    assert "trials/min" in tables._search_table(out)[0]


@pytest.mark.slow
def test_concurrent_processes_share_the_cores_through_the_registry(tmp_path):
    data = DataConfig(source="synthetic", val_size=16, synthetic_train=80, synthetic_test=8)
    job = concurrent.Job(
        (
            (
                "cifar10",
                ModelConfig(embed_dim=8, depth=1, num_heads=2),
                TrainConfig(epochs=1, warmup=0, batch_size=32, precision="fp32"),
            ),
        )
    )
    shared = concurrent.run_concurrent(
        [job] * 4, 2, device="cpu", sharing="on", data=data, cores=4, folder=str(tmp_path)
    )
    alone = concurrent.run_concurrent(
        [job] * 4, 2, device="cpu", sharing="off", data=data, cores=4, folder=str(tmp_path)
    )
    # 4 cores over 2 workers: 2 each, or 1 where this machine is busy with other programs; every core each
    assert shared["threads"] in ([1], [2]) and alone["threads"] == [4]
    assert shared["jobs"] == alone["jobs"] == 4 and shared["img_per_s"] > 0
    assert not list(tmp_path.glob("*.lock"))  # the workers left the registry
    assert shared["load_average"] >= 0  # the share table prints the load beside the wall-time figures


def test_share_table_prints_the_load_average_beside_each_row():
    row = {
        "processes": 2,
        "sharing": "on",
        "jobs_per_minute": 3.0,
        "vs_one_shared": 1.5,
        "threads": [1],
        "job_seconds": 40.0,
        "jobs_per_cpu_minute": 1.6,
        "load_average": 3.25,
    }
    lines = tables._share_table(
        {"jobs": 6, "study": "nkat-smoke", "cores": 2, "precision": {"dtype": "bfloat16"}, "rows": [row]}
    )
    assert lines[1].split()[-1] == "load" and lines[2].split()[-1] == "3.2"


@pytest.mark.slow
def test_procs_section_runs_k_processes_on_one_device():
    out = concurrent.bench_procs(
        ModelConfig(embed_dim=8, depth=1, num_heads=2),
        torch.device("cpu"),
        counts=(1, 2),
        jobs=2,
        images=64,
        eval_images=16,
        batch=32,
        precision="fp32",
    )
    assert [(r["processes"], r["variant"]) for r in out["rows"]] == [(1, "eager"), (2, "eager")]  # no compile on CPU
    assert all(r["img_per_s"] > 0 and r["jobs_per_hour"] > 0 for r in out["rows"])
    assert "img/s" in "\n".join(tables._procs_table(out))


def test_round2_section_times_an_epoch_per_dataset_and_projects_the_search(capsys):
    """Each dataset of Round 2's stages: one epoch at the study's batch, scaled by the stage's
    epochs (10 on CIFAR-10, 5 on each of the rest); the projection is trials x (Stage 1 + pass
    rate x Stage 2), and the table prints both."""
    args = cli.build_parser().parse_args(
        "bench --only round2 --scale 0.004 --pass-rate 0.5 --embed-dim 32 --depth 1 --threads 1 --device cpu --json".split()
    )
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    r2 = result["round2"]
    rows = [(r["stage"], r["dataset"], r["epochs"], r["batch"]) for r in r2["rows"]]
    assert rows == [
        (1, "cifar10", 10, 128),
        (2, "mnist", 5, 128),
        (2, "fashion_mnist", 5, 128),
        (2, "emnist_letters", 5, 128),
    ]
    for r in r2["rows"]:
        assert r["stage_seconds"] == pytest.approx(r["epoch_seconds"] * r["epochs"]) and r["img_per_s"] > 0
        assert r["graphs"] == "off (auto: eager on cpu)" and r["train_images"] >= 2 * r["batch"]
    stage2 = sum(r["stage_seconds"] for r in r2["rows"][1:])
    assert r2["trial_stage2_seconds"] == pytest.approx(stage2)
    assert r2["projected_search_seconds"] == pytest.approx(50 * (r2["rows"][0]["stage_seconds"] + 0.5 * stage2))
    printed = "\n".join(tables._round2_table(r2))
    assert "projected: 50 trials x (Stage 1 + 0.50 x Stage 2)" in printed and "emnist_letters" in printed


def _efficiency_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "search_efficiency.py"
    spec = importlib.util.spec_from_file_location("search_efficiency", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_efficiency_budgets_take_the_median_seed_and_say_when_it_has_no_result():
    se = _efficiency_script()
    run = lambda name, *trials: {
        "pruner": name,
        "seed": 0,
        "study": "s",
        "trials": [  # noqa: E731
            {"state": state, "value": value, "cpu_seconds": cpu, "prune_reason": None} for state, value, cpu in trials
        ],
    }
    runs = [
        run("a", ("COMPLETE", 5.0, 10), ("COMPLETE", 6.0, 30)),
        run("a", ("PRUNED", 1.0, 20), ("COMPLETE", 4.0, 20)),
        run("a", ("COMPLETE", 7.0, 40)),
        run("b", ("PRUNED", 1.0, 40)),
    ]
    lines = se.budget_table(runs, fractions=(0.25, 1.0)).splitlines()
    assert lines[0] == "| pruner | best within 10 CPU s | best within 40 CPU s |"
    # a at 10 s: 5.0, none yet, none yet -> the median seed has nothing; at 40 s: 6.0, 4.0, 7.0 -> 6.0
    assert lines[2:] == ["| a | - | 6.00 |", "| b | - | - |"]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
@pytest.mark.parametrize("after", [1.5, 6.0])
def test_ctrl_c_while_bench_processes_start_ends_with_one_line(tmp_path, after):
    # Ctrl-C reaches the whole process group: the bench, while it imports torch to parse its flags
    # (1.5 s) or while its spawned processes import, wait at the start barrier or train (6 s; 40 jobs
    # last well past that, 2 let the bench end just then). The command ends as any interrupted one does.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nkat_search.cli",
            "bench",
            "--only",
            "procs",
            "--processes",
            "2",
            "--jobs",
            "40",
            "--images",
            "64",
            "--eval-images",
            "32",
            "--embed-dim",
            "32",
            "--depth",
            "1",
            "--batch-size",
            "16",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=child_signals,
        cwd=tmp_path,
    )
    time.sleep(after)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in INTERRUPTED, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "nkat-search: interrupted", err[-3000:]


def test_a_reference_that_is_not_python_is_refused_in_one_sentence(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a module\n")
    with pytest.raises(UsageError, match="is not a Python file"):
        timing.research_pipeline(str(notes))


def test_ops_section_counts_both_parts_of_both_recipes_and_the_step_repeats_exactly(capsys):
    args = cli.build_parser().parse_args(
        "bench --only ops --json --embed-dim 32 --depth 1 --batch-size 8 --images 32 --device cpu --precision fp32".split()
    )
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    section = result["ops"]
    assert (section["batch"], section["precision"], section["batches"]) == (8, "float32", ops.BATCHES)
    rows = {(r["recipe"], r["part"]): r for r in section["rows"]}
    assert list(rows) == [(recipe, part) for recipe in ("research", "round2") for part in ("augment", "step")]
    for r in rows.values():
        assert len(r["ops"]) == ops.BATCHES and all(n > views >= 0 for n, views in zip(r["ops"], r["views"]))
        by_batch = list(zip(*r["sync_prone_by_op"].values())) or [()] * ops.BATCHES
        assert [sum(kinds) for kinds in by_batch] == r["sync_prone"]
    for recipe in ("research", "round2"):  # a batch never waits for the device and can be replayed as a graph
        for part in ("augment", "step"):
            r = rows[(recipe, part)]
            assert r["same_ops"] and r["same_shapes"] and r["same_arguments"] and r["sync_prone"] == [0] * ops.BATCHES
    lines = tables.table(result).splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["recipe", "part"]) + 1
    printed = [line.split()[:9] for line in lines[start:]]
    assert printed == [
        [r["recipe"], r["part"], *("/".join(map(str, r[k])) for k in ("ops", "views", "kernel_ops", "sync_prone"))]
        + ["yes" if r[k] else "no" for k in ("same_ops", "same_shapes", "same_arguments")]
        for r in section["rows"]
    ]


def test_ops_counter_names_the_sync_prone_ops_and_compares_batches():
    x = torch.arange(6.0)
    with ops.OpCounter() as counter:
        mask = x > 2
        x[mask]
        mask.nonzero()
        x.sum().item()
        torch.tensor([1.0, 2.0])
        x * 2
    assert [why for _, _, why, _ in counter.ops if why] == [
        "index (bool mask)",
        "nonzero",
        "_local_scalar_dense",
        "lift_fresh",
    ]
    assert ops.sync_prone("_to_copy", (x,), {"device": torch.device("cuda")}) == "host-device copy"
    assert ops.sync_prone("_to_copy", (x,), {"dtype": torch.bfloat16}) is None
    sizes = iter(range(1, 10))
    grows = ops._count(lambda: torch.ones(next(sizes)) * 2)  # the same ops on other shapes
    assert grows["same_ops"] and not grows["same_shapes"] and grows["sync_prone"] == [0] * ops.BATCHES
    rates = iter([0.1, 0.2, 0.3, 0.4])  # a number from the host per batch, as LambdaLR's learning rate was
    host_numbers = ops._count(lambda: torch.ones(3) * next(rates))
    assert host_numbers["same_shapes"] and not host_numbers["same_arguments"]
    assert ops._count(lambda: torch.ones(3) * torch.tensor(0.5).expand(3))["same_arguments"]
    calls = iter(range(10))
    branches = ops._count(lambda: x.sum() if next(calls) % 2 else x.nonzero())
    assert not branches["same_ops"] and branches["sync_prone_by_op"] == {"nonzero": [0, 1, 0]}
