"""`nkat-search bench`: where the time of training and of a whole search goes, measured on the
device it runs on.

Quick sections (the default): images per second of the real training step beside the bare model
step and the research-style pipeline; batched vs per-image augmentation; evaluation; ask+tell
latency of a storage; peak memory. Asked for by name: `ops` (quick: the aten ops that one batch's
augmentation and training step dispatch, and how many of them wait for the device), and the slow
sections `search` (a search of a study through the worker's own loop, with the time of every trial
split by phase), `share` (smoke-sized trials in 1, 2, 3 concurrent CPU processes, with and without
host sharing), `procs` (K concurrent training processes on one device) and `round2` (a Round 2
trial's wall time at the real datasets' sizes, and the search's projected from it).

Every comparison is taken within one run, side by side: the variants of a section run in turn
inside each repeat (real, bare, research, real, bare, research, ...) and each figure is the median
over the repeats, so a machine shared with other work slows them alike. Absolute figures move
with the machine's load; ratios taken in one run compare.

The research-style pipeline is a reference, not part of the package: benchmarks/
research_pipeline.py of a source checkout. Installed without it, the bench says so and leaves
those rows out.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import psutil
import torch

from .. import devices
from ..config import TrainConfig
from ..devices import choose_precision
from .concurrent import bench_procs, bench_share
from .ops import bench_ops
from .options import DEFAULT_BATCH, BenchOptions
from .round2 import bench_round2
from .search import bench_search
from .steps import bench_augment, bench_eval, bench_train
from .storage import bench_storage
from .timing import _dtype_name, cpu_name, research_pipeline, synthetic_splits

# Concurrent processes of `share` (the CPU) and `procs` (one device) unless --processes says.
SHARE_PROCESSES, PROCS_PROCESSES = (1, 2, 3), (1, 2, 4)


def measure(options: BenchOptions) -> dict:
    """Every section asked for, as one JSON-ready dict."""
    from ..devices import resolve_device

    device = resolve_device(options.device)
    if options.threads:
        torch.set_num_threads(options.threads)
    sections = options.sections
    batch = options.batch_size or DEFAULT_BATCH.get(device.type, 128)
    model_cfg = options.model()
    train_cfg = TrainConfig(batch_size=batch, precision=options.precision, compile=options.compile)
    dtype, reason = choose_precision(options.precision, device)
    out = _header(options, device, model_cfg, batch, dtype, reason)
    reference = research_pipeline(options.reference) if {"train", "augment"} & set(sections) else None
    if "storage" in sections:
        with tempfile.TemporaryDirectory() as tmp:
            url = options.storage or f"journal:{os.path.join(tmp, 'bench.journal')}"
            out["storage"] = bench_storage(url, options.storage_procs, options.storage_ops)
    if {"train", "augment", "eval"} & set(sections):
        splits = synthetic_splits("cifar10", max(options.images, batch), options.eval_images, device)
    if "augment" in sections:
        out["augment"] = bench_augment(
            splits,
            train_cfg,
            batch=options.augment_batch,
            images=options.images,
            repeats=options.repeats,
            reference=reference,
        )
    if "eval" in sections:
        out["eval"] = bench_eval(model_cfg, splits, batch=batch, repeats=options.repeats, precision=options.precision)
    if "train" in sections:
        out["train"] = bench_train(
            model_cfg,
            train_cfg,
            splits,
            steps=options.steps,
            warmup=options.warmup,
            repeats=options.repeats,
            reference=reference,
        )
        out["memory"] = out["train"].pop("memory")
    out.update(_named_sections(options, device, model_cfg))
    return out


def _named_sections(options: BenchOptions, device: torch.device, model_cfg) -> dict:
    """The sections that run only when asked for by name: ops, search, share, procs and round2."""
    sections, out = options.sections, {}
    if "ops" in sections:  # at the recipe's batch unless --batch-size says
        out["ops"] = bench_ops(
            model_cfg,
            device,
            batch=options.batch_size or TrainConfig().batch_size,
            images=options.images,
            precision=options.precision,
        )
    if "search" in sections:  # as a worker: its share of the host's cores, unless --threads says
        out["search"] = bench_search(options.study, options.trials, device, share=options.threads is None)
    if "share" in sections:
        out["share"] = bench_share(options.study, options.processes or SHARE_PROCESSES, options.jobs)
    if "procs" in sections:
        out["procs"] = bench_procs(
            model_cfg,
            device,
            counts=options.processes or PROCS_PROCESSES,
            jobs=options.jobs,
            images=options.images,
            eval_images=options.eval_images,
            batch=options.batch_size or TrainConfig().batch_size,
            precision=options.precision,
        )
    if "round2" in sections:
        out["round2"] = bench_round2(
            model_cfg, device, scale=options.scale, pass_rate=options.pass_rate, precision=options.precision
        )
    return out


def _header(options: BenchOptions, device, model_cfg, batch: int, dtype, reason: str) -> dict:
    """What was measured, on what: the device, torch, the CPU, the precision and the config."""
    bf16 = devices.cpu_bf16_flags()
    return {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": {
            "name": cpu_name(),
            "cores": psutil.cpu_count() or os.cpu_count(),
            "native_bf16": list(bf16) if bf16 is not None else None,
        },
        "precision": {"asked": options.precision, "dtype": _dtype_name(dtype), "reason": reason},
        "config": {
            "model": dataclasses.asdict(model_cfg),
            "batch_size": batch,
            "steps": options.steps,
            "warmup": options.warmup,
            "repeats": options.repeats,
            "compile": options.compile,
            "sections": list(options.sections),
        },
    }
