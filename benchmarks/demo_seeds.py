"""Does the demo hold on any thread count? The smoke study's search, for sampler seeds 0, 1 and 2, each
with 1 and 2 torch threads, against the demo's thresholds (docs/demo.md):

- the best trial by Global TPE reaches at least 3x chance accuracy (1/classes) on every dataset;
- the top five trials by Global TPE are not all one size, a size being (patch_size, embed_dim): with
  the study's fixed heads, depth and stem those two fix the model's parameter count, lambda;
- the gate both stops and passes at least 20% of the finished trials.

A setup is W worker processes with T torch threads each (`WxT`). The default two are what README's
commands run on a 2-core machine: `2x1`, the main job (`start --workers 2`: the host share gives
each worker one core), and `1x2`, `start` without --workers (one worker with both cores).

Each search is the real `nkat-search start --study FILE --trials N --workers W` (nkat_search.cli.main,
in a process of its own) on a fresh journal in a temporary folder. FILE is a copy of the study file
with only `[sampler] seed` changed. The process gets OMP_NUM_THREADS=T and a private temporary folder
(so its workers are the only ones in the host-share registry), and a one-worker search's host share
ignores the load average: a worker otherwise gives up threads while other programs keep the cores
busy, and a 2-thread row could run with 1 thread. Every trial records the threads it ran with
(`torch_threads`); the row fails unless that is exactly T. One worker, a fixed seed and fixed threads
make a search repeat trial for trial; with two workers the order in which trials finish (and so what
the sampler has seen when it asks) depends on timing, so a 2-worker row is one sample of its search.

Searches whose W x T is 1 may run --jobs at a time (one core each); the others run alone.
Exits 1 if any row misses a threshold.

    .venv/bin/python -m benchmarks.demo_seeds                       # the six searches, one table
    .venv/bin/python -m benchmarks.demo_seeds --seeds 0 --setups 1x1 --out runs/demo.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHANCE_MULTIPLE = 3.0  # the best trial: at least 3x chance on every dataset
GATE_SHARE = 0.20  # the gate stops at least 20% of the trials and passes at least 20%
TOP = 5  # the top five are not all one size

# Run in the search's own process: the host share ignores the load average (one worker runs in this
# process; spawned workers share the cores between themselves and get one each on 2 cores), then the
# command line.
RUNNER = """
import sys
from nkat_search.search import hostshare
hostshare.busy_elsewhere = lambda load, own_threads: 0
from nkat_search.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def parse_setup(text: str) -> tuple[int, int]:
    """`WxT` -> (workers, threads), both >= 1."""
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if match is None or min(int(match.group(1)), int(match.group(2))) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not WORKERSxTHREADS (e.g. 2x1); give both as numbers >= 1")
    return int(match.group(1)), int(match.group(2))


def seeded_copy(text: str, seed: int, out: Path) -> Path:
    """A copy of the study file's text with `seed = N` in its [sampler] table replaced, nothing else."""
    table = re.search(r"^\[sampler\]\s*$(.*?)(?=^\[|\Z)", text, flags=re.M | re.S)
    if table is None:
        raise SystemExit("the study file has no [sampler] table")
    body, count = re.subn(r"^seed\s*=\s*\d+", f"seed = {seed}", table.group(1), count=1, flags=re.M)
    if count == 0:  # no seed line: add one
        body = f"\nseed = {seed}" + body
    out.write_text(text[: table.start(1)] + body + text[table.end(1) :])
    return out


def search(study_text: str, seed: int, workers: int, threads: int, trials: int) -> dict:
    """One search in a fresh temporary folder: the finished study's figures and the wall time."""
    with tempfile.TemporaryDirectory(prefix=f"demo-s{seed}-{workers}x{threads}-") as tmp:
        folder = Path(tmp)
        copy = seeded_copy(study_text, seed, folder / "study.toml")
        url = f"journal:{folder / 'search.journal'}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TMPDIR": str(folder), "NKAT_SEARCH_STORAGE": url}
        env.pop("NKAT_SEARCH_STUDY", None)
        command = [sys.executable, "-c", RUNNER, "start", "--study", str(copy), "--trials", str(trials)]
        command += ["--workers", str(workers)]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        (folder / "out.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise SystemExit(f"seed {seed}, {workers}x{threads}: exit {done.returncode}\n{done.stderr[-3000:]}")
        row = figures(url, str(copy))
    return {"seed": seed, "workers": workers, "threads": threads, "wall_seconds": wall, **row}


def size_of(params: dict) -> str:
    return f"p{params['patch_size']}/d{params['embed_dim']}"


def figures(url: str, study_file: str) -> dict:
    """Counts, the gate's shares, the best trial's accuracy / chance per dataset, the top five's sizes."""
    from optuna.trial import TrialState

    from nkat_search.datasets import DATASETS
    from nkat_search.search import studies
    from nkat_search.search.study_file import load_study
    from nkat_search.storage import backends

    config = load_study(study_file)
    study, _ = studies.attach(backends.open_storage(url, create=False), url, config.name)
    trials = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    gate_key = f"{config.stage1_dataset}_local_tpe"
    stopped = [t for t in trials if str(t.user_attrs.get("prune_reason", "")).startswith("gate")]
    passed = [t for t in trials if t.user_attrs.get(gate_key, float("-inf")) >= config.gate]
    complete = sorted(
        (t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: (-t.value, t.number)
    )  # best first
    datasets = [config.stage1_dataset, *config.stage2_datasets]
    best = complete[0] if complete else None
    return {
        "finished": len(trials),
        "complete": len(complete),
        "gate_stopped": len(stopped),
        "gate_passed": len(passed),
        "best_trial": best.number if best else None,
        "best_value": best.value if best else None,
        "best_size": size_of(best.params) if best else None,
        "best_x_chance": {
            d: best.user_attrs[f"{d}_accuracy"] * DATASETS[d].num_classes for d in datasets if best is not None
        },
        "top_sizes": [size_of(t.params) for t in complete[:TOP]],
        "threads_used": sorted({t.user_attrs["torch_threads"] for t in trials if "torch_threads" in t.user_attrs}),
        "stage1_seconds": sum(t.user_attrs.get("stage1_seconds", 0.0) for t in trials),
        "stage2_seconds": sum(t.user_attrs.get("stage2_seconds", 0.0) for t in trials),
        "trials": [  # for the JSON: each trial's state, size, Stage-1 accuracy and lambda, value
            [
                t.number,
                t.state.name,
                size_of(t.params),
                t.user_attrs.get(f"{config.stage1_dataset}_accuracy"),
                t.user_attrs.get(f"{config.stage1_dataset}_lambda"),
                t.value,
            ]
            for t in trials
        ],
    }


def failures(row: dict) -> list[str]:
    """The thresholds a row misses (empty: it holds)."""
    out = []
    if row["threads_used"] != [row["threads"]]:
        out.append(f"ran with {row['threads_used']} threads")
    if row["best_trial"] is None:
        return [*out, "no completed trial"]
    low = [d for d, x in row["best_x_chance"].items() if x < CHANCE_MULTIPLE]
    if low:
        out.append(f"best under {CHANCE_MULTIPLE:g}x chance on {', '.join(low)}")
    if len(set(row["top_sizes"])) < 2:
        out.append("top five one size")
    for key, word in (("gate_stopped", "stopped"), ("gate_passed", "passed")):
        if row[key] < GATE_SHARE * row["finished"]:
            out.append(f"gate {word} under {GATE_SHARE:.0%}")
    return out


SHORT = {"cifar10": "cifar10", "mnist": "mnist", "fashion_mnist": "fashion", "emnist_letters": "emnist"}


def table(rows: list[dict]) -> str:
    """The Markdown table: one row per search."""
    datasets = list(rows[0]["best_x_chance"]) if rows and rows[0]["best_x_chance"] else list(SHORT)
    head = [
        "seed",
        "workers x threads",
        "complete",
        "gate stopped",
        "gate passed",
        "best trial",
        *(f"{SHORT.get(d, d)} ÷ chance" for d in datasets),
        "top five sizes (patch/embed)",
        "wall s",
        "thresholds",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        n = max(1, r["finished"])
        miss = failures(r)
        cells = [
            str(r["seed"]),
            f"{r['workers']} x {r['threads']}",
            f"{r['complete']} of {r['finished']}",
            f"{r['gate_stopped']} ({r['gate_stopped'] / n:.0%})",
            f"{r['gate_passed']} ({r['gate_passed'] / n:.0%})",
            "-" if r["best_trial"] is None else f"{r['best_trial']} ({r['best_size']})",
            *(f"{r['best_x_chance'][d]:.1f}x" if d in r["best_x_chance"] else "-" for d in datasets),
            ", ".join(x.replace("p", "").replace("/d", "/") for x in r["top_sizes"]),
            f"{r['wall_seconds']:.0f}",
            "hold" if not miss else "FAIL: " + "; ".join(miss),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_all(study_text: str, seeds: list[int], setups: list[tuple[int, int]], trials: int, jobs: int) -> list[dict]:
    """Every (seed, setup) search of the study file's text (read once, before the first search): the
    one-core ones `jobs` at a time, the others one at a time; rows in the order seeds x setups."""
    plan = [(s, w, t) for s in seeds for w, t in setups]
    rows: dict[tuple[int, int, int], dict] = {}

    def one(key: tuple[int, int, int]) -> None:
        rows[key] = search(study_text, *key, trials)
        r = rows[key]
        print(f"seed {key[0]}, {key[1]}x{key[2]}: {r['wall_seconds']:.0f} s, {failures(r) or 'holds'}", flush=True)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, [k for k in plan if k[1] * k[2] == 1]))
    for key in (k for k in plan if k[1] * k[2] != 1):
        one(key)
    return [rows[k] for k in plan]


def main(argv: list[str] | None = None) -> int:
    from nkat_search.search.study_file import study_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="smoke", help="a packaged study's name or a study file (default smoke)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--setups",
        type=parse_setup,
        nargs="+",
        default=[(2, 1), (1, 2)],
        help="WORKERSxTHREADS per search (default: 2x1 1x2, the main job and `start` without --workers)",
    )
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=2, help="one-core (1x1) searches at a time (default 2)")
    parser.add_argument("--out", help="write the rows as JSON here too")
    args = parser.parse_args(argv)
    rows = run_all(Path(study_path(args.study)).read_text(), args.seeds, args.setups, args.trials, args.jobs)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 1 if any(failures(r) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
