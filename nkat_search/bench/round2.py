"""The round2 section: the wall time of one trial of the Round 2 study at the real datasets' sizes
(synthetic images of their shapes), and Round 2's whole search on one device projected from it.

A whole trial (10 CIFAR-10 epochs, then 5 on each of three datasets) takes longer than a GPU check
has, so one epoch of each dataset is timed, as fit() runs it (the study's recipe and batch for that
dataset, one validation pass, graphs = "auto") and scaled by its stage's epochs; the rows say so.
The projection: trials x (Stage 1 + pass rate x Stage 2), one trial at a time on one device; the
pass rate is a measured share of trials that passed the gate (--pass-rate; by default the demo's
main job, 30 of 50, docs/demo.md). --scale times a fraction of the real sizes (the CPU test's tiny run).
"""

from __future__ import annotations

import time

import torch

from ..config import DataConfig, ModelConfig, replace
from ..data.loader import load_splits
from ..search.study_file import load_study
from ..train import fit

# Training images of each real dataset (validation is held out of these, as in a search).
REAL_TRAIN_IMAGES = {"cifar10": 50_000, "mnist": 60_000, "fashion_mnist": 60_000, "emnist_letters": 124_800}
# The model fields the bench's --conv-stem/--patch-size/--embed-dim/--depth set; the study's fixed
# settings and the recipe give the rest.
MODEL_FIELDS = ("conv_stem", "patch_size", "embed_dim", "depth")


def bench_round2(
    model_cfg: ModelConfig, device: torch.device, *, scale: float, pass_rate: float, precision: str
) -> dict:
    """One epoch per dataset of Round 2's stages at scale x the real sizes, scaled to the stages'
    epochs, and the study's trials projected at pass_rate."""
    study = load_study("round2")
    params = {k: getattr(model_cfg, k) for k in MODEL_FIELDS}
    stages = [(1, study.stage1_dataset, study.stage1_epochs)]
    stages += [(2, name, study.stage2_epochs) for name in study.stage2_datasets]
    rows = []
    for stage, name, epochs in stages:
        row_cfg, train_cfg = study.configs_for(params, name, 1)
        train_cfg = replace(train_cfg, warmup=0, precision=precision)
        val = max(1, round(study.data.validation_images * scale))
        images = max(round(REAL_TRAIN_IMAGES[name] * scale), val + 2 * train_cfg.batch_size)
        made = time.perf_counter()
        data = DataConfig(source="synthetic", val_size=val, synthetic_train=images, synthetic_test=1)
        splits = load_splits(name, data, device)
        made = time.perf_counter() - made
        result = fit(row_cfg, train_cfg, splits)
        rows.append(
            {
                "stage": stage,
                "dataset": name,
                "train_images": len(splits.train_y),
                "val_images": val,
                "batch": train_cfg.batch_size,
                "epoch_seconds": result.seconds,
                "img_per_s": result.images_per_second,
                "epochs": epochs,
                "stage_seconds": result.seconds * epochs,  # one epoch timed, scaled by the epochs
                "data_seconds": made,  # making the synthetic images; not part of a trial's time
                "graphs": result.graphs,
                "precision": result.precision,
            }
        )
    stage1 = sum(r["stage_seconds"] for r in rows if r["stage"] == 1)
    stage2 = sum(r["stage_seconds"] for r in rows if r["stage"] == 2)
    return {
        "study": study.name,
        "scale": scale,
        "model": {k: getattr(model_cfg, k) for k in MODEL_FIELDS},
        "rows": rows,
        "trial_stage1_seconds": stage1,
        "trial_stage2_seconds": stage2,
        "trials": study.trials,
        "pass_rate": pass_rate,
        "projected_search_seconds": study.trials * (stage1 + pass_rate * stage2),
    }
