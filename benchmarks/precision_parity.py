"""Accuracy parity of bf16 autocast against fp32 on the CPU: the check behind `precision = "auto"`
choosing bf16 on CPUs with native bf16 (README.md, "precision auto").

For each model, the same short training run with several seeds at fp32 and at bf16 (seed: weight
initialisation, batch order and augmentation), validation accuracy of the EMA weights at the end.
bf16 passes where its mean lies within the spread (min..max) of the fp32 seeds.

    .venv/bin/python benchmarks/precision_parity.py --out parity.json

Synthetic CIFAR-10-shaped data (nkat_search.data), so it runs without the real files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from nkat_search.config import DataConfig, ModelConfig, TrainConfig
from nkat_search.data.loader import load_splits
from nkat_search.devices import cpu_bf16_flags
from nkat_search.train import fit

# (name, model, recipe): a smoke-sized model with the smoke study's Stage-1 recipe, and the
# research's baseline model for a short run of the research's recipe (lr 2e-4).
RUNS = {
    "smoke-sized (embed 64, depth 3, small stem, patch 2), 3 epochs, batch 64, lr 1e-3": (
        ModelConfig(embed_dim=64, depth=3, num_heads=4, conv_stem="small", patch_size=2),
        TrainConfig(epochs=3, warmup=1, batch_size=64, lr=1e-3),
    ),
    "research baseline (embed 384, depth 7, tiny stem, patch 2), 2 epochs, batch 32, lr 2e-4": (
        ModelConfig(),
        TrainConfig(epochs=2, warmup=1, batch_size=32),
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per precision [%(default)s]")
    parser.add_argument("--images", type=int, default=2000, help="synthetic train + validation images [%(default)s]")
    parser.add_argument("--val", type=int, default=400, help="validation images [%(default)s]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads [%(default)s]")
    parser.add_argument("--only", type=int, default=None, help="run only the n-th model of RUNS (0-based)")
    parser.add_argument("--out", default=None, help="JSON file for every accuracy")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    splits = load_splits(
        "cifar10", DataConfig(source="synthetic", synthetic_train=args.images, val_size=args.val, synthetic_test=1)
    )
    results = {"cpu_native_bf16": list(cpu_bf16_flags() or ()), "torch": torch.__version__, "runs": {}}
    for index, (name, (model, recipe)) in enumerate(RUNS.items()):
        if args.only is not None and index != args.only:
            continue
        accuracy: dict[str, list[float]] = {"fp32": [], "bf16": []}
        cpu: dict[str, float] = {"fp32": 0.0, "bf16": 0.0}
        for seed in range(args.seeds):
            for precision in ("fp32", "bf16"):  # interleaved, so load on the machine hits both alike
                start = time.process_time()
                result = fit(model, dataclasses.replace(recipe, seed=seed, precision=precision), splits)
                cpu[precision] += time.process_time() - start
                accuracy[precision].append(result.accuracy)
        lo, hi = min(accuracy["fp32"]), max(accuracy["fp32"])
        mean = statistics.mean(accuracy["bf16"])
        results["runs"][name] = {
            "accuracy": accuracy,
            "cpu_seconds": cpu,
            "fp32_spread": [lo, hi],
            "bf16_mean": mean,
            "fp32_mean": statistics.mean(accuracy["fp32"]),
            "within_spread": lo <= mean <= hi,
        }
        print(
            f"| {name} | {', '.join(f'{a:.4f}' for a in accuracy['fp32'])} | "
            f"{', '.join(f'{a:.4f}' for a in accuracy['bf16'])} | {lo:.4f}-{hi:.4f} | {mean:.4f} | "
            f"{'yes' if lo <= mean <= hi else 'no'} | {cpu['fp32'] / cpu['bf16']:.2f}x |",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
