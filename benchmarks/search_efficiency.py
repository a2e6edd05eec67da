"""Search efficiency of the pruners on a study: the best Global TPE reached against the CPU seconds
spent, over several sampler seeds, for each pruner (the gate applies in every case). Behind the
default pruner of the packaged studies (README.md, "Search efficiency of the pruners").

Each run is a search of --trials trials through the worker's own loop (nkat_search.bench.
bench_search: worker.run_loop on a temporary journal), one process, one torch thread, so that the
process's CPU time is the cost of the search whatever else the machine runs. Runs of different
pruners may run at the same time (--pruners picks some); the figures are CPU seconds, not wall.

    .venv/bin/python benchmarks/search_efficiency.py --study smoke --out runs/efficiency.json
    .venv/bin/python benchmarks/search_efficiency.py --plot runs/efficiency*.json --png docs/img/efficiency.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from nkat_search.search.kinds import (
    HyperbandPrunerConfig,
    MedianPrunerConfig,
    NopPrunerConfig,
    SuccessiveHalvingPrunerConfig,
)

# The pruners compared, with the keys the packaged studies would use. max_resource of Hyperband is
# the study's Stage-1 epochs (nkat_search.search.space).
PRUNERS = {
    "median": MedianPrunerConfig(n_startup_trials=5, n_warmup_steps=1),
    "successive_halving": SuccessiveHalvingPrunerConfig(min_resource=1, reduction_factor=3),
    "hyperband": HyperbandPrunerConfig(min_resource=1, reduction_factor=3),
    "none": NopPrunerConfig(),
    "study": None,  # the study file's own pruner
}


def run(study: str, pruners: list[str], seeds: list[int], trials: int) -> list[dict]:
    """One search per (pruner, seed): per trial its state, value and CPU seconds."""
    import torch

    from nkat_search.bench.search import bench_search
    from nkat_search.search.study_file import load_study

    torch.set_num_threads(1)
    base = load_study(study)
    out = []
    for seed in seeds:
        for name in pruners:
            config = dataclasses.replace(
                base,
                name=f"{base.name}-{name}-{seed}",
                pruner=PRUNERS[name] or base.pruner,
                sampler=dataclasses.replace(base.sampler, seed=seed),
            )
            result = bench_search(config, trials, torch.device("cpu"), share=False)
            label = name if PRUNERS[name] else f"{base.pruner.KIND} (the study's)"
            out.append(
                {
                    "pruner": label,
                    "seed": seed,
                    "study": base.name,
                    "trials": [
                        {k: r[k] for k in ("trial", "state", "value", "prune_reason", "cpu_seconds", "seconds")}
                        for r in result["per_trial"]
                    ],
                }
            )
            print(
                f"{label} seed {seed}: best {best(out[-1]):.4f} after {sum(t['cpu_seconds'] for t in out[-1]['trials']):.0f} "
                "CPU s",
                flush=True,
            )
    return out


def best(run_: dict) -> float:
    values = [t["value"] for t in run_["trials"] if t["state"] == "COMPLETE"]
    return max(values) if values else float("nan")


def curve(run_: dict) -> tuple[list[float], list[float]]:
    """(cumulative CPU seconds, best value so far) at the end of each trial that improved it."""
    xs, ys, spent, top = [], [], 0.0, float("-inf")
    for t in run_["trials"]:
        spent += t["cpu_seconds"]
        if t["state"] == "COMPLETE" and t["value"] > top:
            top = t["value"]
            xs.append(spent)
            ys.append(top)
    return xs, ys


def best_at(run_: dict, seconds: float) -> float | None:
    """The best value reached within `seconds` CPU seconds (None: no completed trial yet)."""
    xs, ys = curve(run_)
    reached = [y for x, y in zip(xs, ys) if x <= seconds]
    return reached[-1] if reached else None


def summary(runs: list[dict]) -> str:
    """The Markdown table of speed.md: per pruner, over its seeds."""
    spent = {id(r): sum(t["cpu_seconds"] for t in r["trials"]) for r in runs}
    budget = min(spent.values())  # every run spent at least this much: the fair point to compare
    target = 0.95 * max(best(r) for r in runs)
    lines = [
        f"| pruner | seeds | CPU s per run | best Global TPE per seed | mean | mean best within {budget:.0f} CPU s | "
        f"CPU s to reach {target:.2f} (95% of the best of all runs) | per run: pruned by pruner / by gate / "
        "complete |",
        "|---" * 8 + "|",
    ]
    for name in dict.fromkeys(r["pruner"] for r in runs):
        group = [r for r in runs if r["pruner"] == name]
        bests = [best(r) for r in group]
        within = [best_at(r, budget) or 0.0 for r in group]
        reach = [next((x for x, y in zip(*curve(r)) if y >= target), None) for r in group]
        reach_text = ", ".join("not reached" if x is None else f"{x:.0f}" for x in reach)
        count = lambda test: sum(test(t) for r in group for t in r["trials"]) / len(group)  # noqa: E731
        by_gate = count(lambda t: (t.get("prune_reason") or "").startswith("gate"))
        by_pruner = count(lambda t: t["state"] == "PRUNED") - by_gate
        complete = count(lambda t: t["state"] == "COMPLETE")
        lines.append(
            f"| {name} | {len(group)} | {statistics.mean(spent[id(r)] for r in group):.0f} | "
            f"{', '.join(f'{b:.2f}' for b in bests)} | {statistics.mean(bests):.2f} | "
            f"{statistics.mean(within):.2f} | {reach_text} | {by_pruner:.1f} / {by_gate:.1f} / {complete:.1f} |"
        )
    return "\n".join(lines)


def budget_table(runs: list[dict], fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)) -> str:
    """Markdown: per pruner, the median over its seeds of the best Global TPE reached within a few CPU
    budgets (fractions of the cheapest run's total, so every run is still searching at each); "-" where
    the median run had no completed trial yet."""
    cheapest = min(sum(t["cpu_seconds"] for t in r["trials"]) for r in runs)
    budgets = [cheapest * f for f in fractions]
    lines = [
        "| pruner | " + " | ".join(f"best within {b:.0f} CPU s" for b in budgets) + " |",
        "|---" * (len(budgets) + 1) + "|",
    ]
    for name in dict.fromkeys(r["pruner"] for r in runs):
        group = [r for r in runs if r["pruner"] == name]
        cells = []
        for b in budgets:
            reached = sorted((best_at(r, b) for r in group), key=lambda v: float("-inf") if v is None else v)
            middle = reached[(len(reached) - 1) // 2]  # the median run (the lower one of an even count)
            cells.append("-" if middle is None else f"{middle:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[dict], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"median": "tab:blue", "successive_halving": "tab:orange", "hyperband": "tab:green", "none": "tab:gray"}
    colours.update({r["pruner"]: "tab:red" for r in runs if r["pruner"] not in colours})
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    end = max(sum(t["cpu_seconds"] for t in r["trials"]) for r in runs)
    grid = [end * i / 200 for i in range(201)]
    for name in dict.fromkeys(r["pruner"] for r in runs):
        group = [r for r in runs if r["pruner"] == name]
        for r in group:
            xs, ys = curve(r)
            ax.step(xs, ys, where="post", color=colours.get(name), alpha=0.3, linewidth=1)
        # The median line ends where the median run ended: past it, fewer than half the runs still search.
        stop = statistics.median(sum(t["cpu_seconds"] for t in r["trials"]) for r in group)
        median = []
        for x in grid:
            values = [best_at(r, x) for r in group]
            ok = x <= stop and all(v is not None for v in values)
            median.append(statistics.median(values) if ok else float("nan"))
        ax.plot(grid, median, color=colours.get(name), linewidth=2.5, label=f"{name} (median of {len(group)} seeds)")
    ax.set_xlabel("CPU seconds spent (one torch thread)")
    ax.set_ylabel("best Global TPE so far")
    ax.set_title(f"{runs[0]['study']}: best Global TPE against compute, by pruner (the gate applies in all)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="smoke", help="packaged study or file [%(default)s]")
    parser.add_argument(
        "--pruners",
        nargs="+",
        default=[p for p in PRUNERS if p != "study"],
        choices=list(PRUNERS),
        help="study: the study file's own pruner [all but study]",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="sampler seeds [0 1 2]")
    parser.add_argument("--trials", type=int, default=24, help="trials per run [%(default)s]")
    parser.add_argument("--out", help="JSON file for the runs")
    parser.add_argument("--plot", nargs="+", help="JSON files of earlier runs: print the table, draw --png")
    parser.add_argument("--png", default="docs/img/efficiency.png")
    args = parser.parse_args()
    if args.plot:
        runs = [r for path in args.plot for r in json.loads(Path(path).read_text())]
        print(summary(runs), budget_table(runs), sep="\n\n")
        plot(runs, args.png)
        return
    runs = run(args.study, args.pruners, args.seeds, args.trials)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(runs, indent=1))
    print(summary(runs), budget_table(runs), sep="\n\n")


if __name__ == "__main__":
    main()
