"""The command line. Parses flags into config objects and calls the library; no logic of its own."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from .config import DataConfig, ModelConfig, TrainConfig, UsageError, adapt_patch_size

log = logging.getLogger("nkat_search")
MODEL_DEFAULTS, TRAIN_DEFAULTS = ModelConfig(), TrainConfig()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one sentence, exit 2
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _flag(group, name: str, **kwargs) -> None:
    """Add --name and, for snake_case names, its --kebab-case twin (both spellings welcome)."""
    spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    group.add_argument(*spellings, dest=name, **kwargs)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (defaults: the research's baseline)")
    d = MODEL_DEFAULTS
    _flag(g, "conv_stem", choices=["off", "tiny", "small"], default=d.conv_stem,
          help="hybrid conv stem before the patch embedding: off, tiny (32->64 ch, /4) or small (64->128->128, /4) [%(default)s]")
    _flag(g, "patch_size", type=int, default=None,
          help="patch side on the stem's feature map; must divide it [2 on 32x32; on 28x28 the largest divisor <= 2]")
    _flag(g, "embed_dim", type=int, default=d.embed_dim, help="token width; a multiple of --num_heads [%(default)s]")
    _flag(g, "depth", type=int, default=d.depth, help="number of transformer blocks [%(default)s]")
    _flag(g, "num_heads", type=int, default=d.num_heads, help="attention heads per block [%(default)s]")
    _flag(g, "temperature", type=float, default=d.temperature,
          help="initial attention temperature (logits are divided by it; learnable per layer), > 0 [%(default)s]")
    _flag(g, "top_k", type=int, default=d.top_k, help="keys kept per query by the top-k filter; 0 = off [%(default)s]")
    _flag(g, "top_p", type=float, default=d.top_p,
          help="nucleus mass kept per query by the top-p filter, in (0, 1]; 1 = off [%(default)s]")
    _flag(g, "nkat_strength", type=float, default=d.nkat_strength,
          help="NKAT modulation strength s of the attention weights (1 + s*r^l*theta); 0 = off [%(default)s]")
    _flag(g, "nkat_decay", type=float, default=d.nkat_decay, help="per-layer decay r of the NKAT strength [%(default)s]")
    _flag(g, "dropout_attn", type=float, default=d.dropout_attn, help="dropout on attention weights [%(default)s]")
    _flag(g, "dropout_embed", type=float, default=d.dropout_embed, help="dropout after the position embedding [%(default)s]")
    _flag(g, "split_heads", action="store_true", help="split-head attention: one head per colour channel (off)")
    _flag(g, "channel_shuffle", action="store_true", help="random colour-channel order per training image (off)")
    _flag(g, "no_color_norm", action="store_true", help="turn off the colour-wise LayerNorm before the stem")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training recipe (defaults: the research's)")
    d = TRAIN_DEFAULTS
    _flag(g, "epochs", type=int, default=d.epochs, help="training epochs, each over the whole training split [%(default)s]")
    _flag(g, "warmup", type=int, default=d.warmup, help="epochs of linear learning-rate warm-up before cosine decay [%(default)s]")
    _flag(g, "lr", type=float, default=d.lr, help="peak AdamW learning rate [%(default)s]")
    _flag(g, "weight_decay", type=float, default=d.weight_decay, help="AdamW weight decay on weight matrices [%(default)s]")
    _flag(g, "batch_size", type=int, default=d.batch_size, help="images per step [%(default)s]")
    _flag(g, "ema", type=float, default=d.ema, help="EMA decay of the weights used for evaluation; 0 = off [%(default)s]")
    _flag(g, "clip_grad", type=float, default=d.clip_grad, help="gradient-norm clipping; 0 = off [%(default)s]")
    _flag(g, "label_smoothing", type=float, default=d.label_smoothing, help="label smoothing [%(default)s]")
    _flag(g, "mixup", type=float, default=d.mixup, help="MixUp Beta(alpha, alpha) on batches without CutMix; 0 = off [%(default)s]")
    _flag(g, "cutmix", type=float, default=d.cutmix, help="probability that a batch uses CutMix; 0 = off [%(default)s]")
    _flag(g, "randaugment", type=int, nargs=2, metavar=("N", "M"), default=list(d.randaugment),
          help="RandAugment ops per image and magnitude (0-30), per chunk of the batch; N=0 = off [2 9]")
    _flag(g, "cutout", type=int, default=d.cutout, help="side in pixels of the square erased per image; 0 = off [%(default)s]")
    _flag(g, "seed", type=int, default=d.seed, help="seed of initialisation, batches and augmentation [%(default)s]")
    _flag(g, "precision", choices=["auto", "fp32", "bf16"], default=d.precision,
          help="auto: bf16 autocast on CUDA, fp32 on the CPU [%(default)s]")
    _flag(g, "limit_train", type=int, default=0,
          help="at most this many batches per epoch (recorded in the output); 0 = whole epochs [%(default)s]")
    _flag(g, "compile", action="store_true", help="torch.compile the model (pays on CUDA for long runs only)")


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    _flag(g, "data_source", choices=["torchvision", "synthetic"], default="torchvision",
          help="torchvision: the real datasets under --data-root (downloaded when absent and the network allows); "
               "synthetic: generated images with the real shapes and class counts [%(default)s]")
    _flag(g, "data_root", default=None, help="folder of the real datasets [$NKAT_SEARCH_DATA_ROOT or ./data]")
    _flag(g, "val_size", type=int, default=None,
          help="validation images held out from the training set [5000; 1000 for synthetic]")
    _flag(g, "synthetic_train", type=int, default=6000, help="synthetic images generated for train + validation [%(default)s]")


def _data_config(args, data_root_default: str) -> DataConfig:
    synthetic = args.data_source == "synthetic"
    return DataConfig(
        source=args.data_source, root=args.data_root or data_root_default,
        val_size=args.val_size or (1000 if synthetic else 5000), synthetic_train=args.synthetic_train,
    )


def _configs(args, spec) -> tuple[ModelConfig, TrainConfig]:
    stem = args.conv_stem
    patch = args.patch_size if args.patch_size is not None else adapt_patch_size(spec.image_size, stem, 2)
    model_cfg = ModelConfig(
        in_chans=spec.channels, img_size=spec.image_size, num_classes=spec.num_classes, conv_stem=stem,
        patch_size=patch, embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, nkat_strength=args.nkat_strength,
        nkat_decay=args.nkat_decay, dropout_attn=args.dropout_attn, dropout_embed=args.dropout_embed,
        split_heads=args.split_heads, channel_shuffle=args.channel_shuffle, color_norm=not args.no_color_norm,
    )
    train_cfg = TrainConfig(
        epochs=args.epochs, warmup=args.warmup, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, ema=args.ema, clip_grad=args.clip_grad,
        label_smoothing=args.label_smoothing, mixup=args.mixup, cutmix=args.cutmix,
        randaugment=tuple(args.randaugment), cutout=args.cutout, seed=args.seed, precision=args.precision,
        limit_train=args.limit_train, compile=args.compile,
    )
    return model_cfg, train_cfg


def data_root_default() -> str:
    return os.environ.get("NKAT_SEARCH_DATA_ROOT", "data")


def resolve_device(name: str):
    """auto -> cuda when available, else cpu; a CUDA index that does not exist is a usage error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device {name!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise UsageError(f"device {name} does not exist: this machine has {count} CUDA device(s); "
                             "use --device cpu or an index below the count.")
    elif device.type != "cpu":
        raise UsageError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N.")
    return device


def cmd_train(args) -> int:
    from .data import get_spec, load_splits
    from .train import fit

    spec = get_spec(args.dataset)
    model_cfg, train_cfg = _configs(args, spec)
    data_cfg = _data_config(args, data_root_default())
    device = resolve_device(args.device)
    splits = load_splits(args.dataset, data_cfg, device)

    def on_epoch(epoch: int, accuracy: float, tpe: float) -> None:
        log.info("epoch %d/%d  val accuracy %.4f  local TPE %.4f", epoch, train_cfg.epochs, accuracy, tpe)

    result = fit(model_cfg, train_cfg, splits, on_epoch=on_epoch, eval_test=args.eval_test)
    summary = result.summary()
    summary["data_source"] = data_cfg.source
    if args.json:
        print(json.dumps(summary))
    else:
        test = f"  test accuracy {summary['test_accuracy']:.4f}" if args.eval_test else ""
        print(f"{summary['dataset']}: val accuracy {summary['accuracy']:.4f}{test}  local TPE {summary['local_tpe']:.4f}  "
              f"params {summary['params']:,} (lambda {summary['lambda']:.3f})  {summary['epochs']} epochs in "
              f"{summary['seconds']:.1f} s ({summary['images_per_second']:.0f} img/s, {summary['precision']}, "
              f"{summary['device']})")
    return 0


def _open(args):
    from . import storage

    url = storage.resolve_url(args.storage)
    return url, storage.open_storage(url)


def _attach(args):
    from . import storage

    url = storage.resolve_url(args.storage)
    store = storage.open_storage(url, create=False)
    study, config = storage.attach(store, url, args.study or os.environ.get("NKAT_SEARCH_STUDY"))
    return url, study, config


def _plan(args) -> tuple[list[str], int]:
    """(devices, worker processes) from --gpus and --workers; checked before the storage is touched."""
    from . import worker

    devices = worker.parse_devices(args.gpus)
    count = args.workers if args.workers is not None else len(devices)
    if count < 0:
        raise UsageError(f"--workers must be >= 0, got {count}.")
    return devices, count


def _run(url: str, study_name: str, args, plan: tuple[list[str], int]) -> int:
    from . import worker

    devices, count = plan
    if count == 0:
        return 0
    if count == 1:
        worker.install_signal_handlers()
        return worker.run_worker(url, study_name, devices[0], max_failures=args.max_failures,
                                 data_root=_data_root(args))
    return worker.run_processes(url, study_name, devices, count, args.verbose, _data_root(args))


def _data_root(args) -> str | None:
    """--data-root, else $NKAT_SEARCH_DATA_ROOT, else None (the study file's data.root)."""
    return args.data_root or os.environ.get("NKAT_SEARCH_DATA_ROOT")


def cmd_start(args) -> int:
    from . import dashboard, storage
    from .config import load_study
    from .data import ensure_available

    config = load_study(args.study)
    budget = args.trials if args.trials is not None else config.trials
    if budget < 1:
        raise UsageError(f"--trials must be at least 1, got {budget}.")
    plan = _plan(args)
    data = dataclasses.replace(config.data, root=_data_root(args) or config.data.root)
    for dataset in (config.stage1_dataset, *config.stage2_datasets):
        ensure_available(dataset, data)
    url, store = _open(args)
    log.info("storage: %s", storage.mask(url))
    study = storage.create_or_resume(store, url, config, budget)
    dashboard.annotate_study(study)
    log.info("study %r: budget %d trials (%d finished so far)", config.name, budget,
             sum(t.state.is_finished() and t.state.name != "FAIL" for t in study.get_trials(deepcopy=False)))
    code = _run(url, config.name, args, plan)
    if code == 0 and args.workers != 0:
        _print_status(study, config)
    return code


def cmd_worker(args) -> int:
    from . import storage

    plan = _plan(args)
    url, study, _ = _attach(args)
    log.info("storage: %s", storage.mask(url))
    return _run(url, study.study_name, args, plan)


def _print_status(study, config) -> None:
    from .report import format_status, status

    print(format_status(status(study, config)))


def cmd_status(args) -> int:
    from .report import format_status, status

    _, study, config = _attach(args)
    s = status(study, config)
    print(json.dumps(s) if args.json else format_status(s))
    return 0


def cmd_leaderboard(args) -> int:
    from .report import leaderboard

    _, study, config = _attach(args)
    frame = leaderboard(study, config, args.top)
    if args.format == "json":
        print(frame.to_json(orient="records"))
    elif args.format == "csv":
        print(frame.to_csv(index=False), end="")
    elif frame.empty:
        print("no completed trials yet")
    else:
        print(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


def cmd_export(args) -> int:
    from .report import export

    _, study, _ = _attach(args)
    rows = export(study, args.out)
    print(f"wrote {rows} trials to {args.out}")
    return 0


def cmd_dashboard(args) -> int:
    from .dashboard import serve

    _, store = _open(args)
    serve(store, host=args.host, port=args.port)
    return 0


def cmd_report(args) -> int:
    from .retrain import build_report, format_markdown

    url, study, config = _attach(args)
    out = args.out or os.path.join("reports", study.study_name)
    report = build_report(study, config, top=args.top, epochs=args.epochs, out=out,
                          device=resolve_device(args.device), artifacts=args.artifacts, storage_url=url)
    print(format_markdown(report), end="")
    print(f"wrote {os.path.join(out, 'report.json')} and {os.path.join(out, 'report.md')}")
    return 0


def cmd_plots(args) -> int:
    from .plots import write_plots

    _, study, config = _attach(args)
    out = args.out or os.path.join("reports", study.study_name, "plots")
    result = write_plots(study, config, out, png=not args.no_png, dashboard=not args.no_dashboard)
    for path in result["written"]:
        print(f"wrote {path}")
    for name, reason in result["skipped"].items():
        print(f"left out {name}: {reason}")
    if result["dashboard"]:
        print(f"attached {len(result['dashboard'])} figures to study {study.study_name!r} for optuna-dashboard")
    return 0


def cmd_attention(args) -> int:
    from .plots import attention

    _, study, config = _attach(args)
    out = args.out or os.path.join("reports", study.study_name, f"attention-trial-{args.trial}-{args.dataset}")
    paths = attention(study, config, args.trial, args.dataset, args.images, out, args.artifacts)
    print(f"wrote {len(paths) - 1} attention maps and a summary to {out}")
    return 0


def cmd_bench(args) -> int:
    from .bench import measure, table

    result = measure(args)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


def cmd_studies(args) -> int:
    from .config import load_study, packaged_studies, study_path

    if args.copy:
        name, dest = args.copy
        source = study_path(name)
        target = Path(dest)
        if target.exists():
            raise UsageError(f"{target} already exists; pick another file name or remove it first.")
        if not target.parent.is_dir():
            raise UsageError(f"cannot write {target}: the folder {target.parent} does not exist; create it first.")
        target.write_bytes(source.read_bytes())
        print(f"wrote {target} (a copy of {name}); edit it, then `nkat-search start --study {target}`")
        return 0
    for name, path in packaged_studies().items():
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        config = load_study(str(path))
        print(f"{name:8s} {config.trials:3d} trials, gate {config.gate:g} on {config.stage1_dataset}: {first}")
    return 0


def cmd_download(args) -> int:
    from .data import ensure_available

    data = DataConfig(source="torchvision", root=args.data_root or data_root_default())
    for dataset in args.datasets:
        ensure_available(dataset, data)
        print(f"{dataset}: ready under {data.root}/")
    return 0


def _add_storage_flags(p: argparse.ArgumentParser, study_help: str | None) -> None:
    p.add_argument("--storage", help="Optuna storage URL, e.g. postgresql+psycopg://user:pass@host/db or "
                                     "journal:FILE [$NKAT_SEARCH_STORAGE or journal:nkat-search.journal]")
    if study_help:
        p.add_argument("--study", help=study_help)


def _add_run_flags(p: argparse.ArgumentParser, workers_help: str) -> None:
    p.add_argument("--workers", type=int, default=None, help=workers_help)
    p.add_argument("--gpus", help="GPU indices for the trial processes, e.g. 0,1, or cpu [every visible GPU, else cpu]")
    p.add_argument("--max-failures", type=int, default=3,
                   help="stop a worker after this many trials in a row failed [%(default)s]")
    p.add_argument("--data-root", help="where the real datasets lie on this host "
                                       "[$NKAT_SEARCH_DATA_ROOT, else the study file's data.root]")


def _add_bench_parser(sub) -> None:
    from .bench import SECTIONS

    m = MODEL_DEFAULTS
    p = sub.add_parser(
        "bench", help="measure training, augmentation and evaluation speed, storage latency and memory",
        description="Images per second of the real training step (TrainStep over BatchLoader) beside the bare "
                    "model step and the research-style pipeline, measured side by side in one run; batched vs "
                    "per-image PIL augmentation; evaluation; ask+tell latency of a storage; peak memory. "
                    "Figures are medians over --repeats rounds on synthetic CIFAR-10-shaped data.")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [%(default)s]")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 on CUDA, fp32 on the CPU; a CPU with native bf16 also gets a bf16 row [%(default)s]")
    p.add_argument("--batch-size", type=int, default=None, help="images per step [32 on the CPU, 512 on CUDA]")
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant per round [%(default)s]")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first [%(default)s]")
    p.add_argument("--repeats", type=int, default=3, help="rounds; figures are their median [%(default)s]")
    p.add_argument("--augment-batch", type=int, default=512,
                   help="batch of the augment figure; GPU-sized, where the pipeline matters [%(default)s]")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads; 1 is steadier on a machine shared with other work [torch's default]")
    p.add_argument("--images", type=int, default=1024, help="synthetic training images [%(default)s]")
    p.add_argument("--eval-images", type=int, default=256, help="images per evaluation pass [%(default)s]")
    p.add_argument("--conv-stem", choices=["off", "tiny", "small"], default=m.conv_stem, help="[%(default)s]")
    p.add_argument("--patch-size", type=int, default=m.patch_size, help="[%(default)s]")
    p.add_argument("--embed-dim", type=int, default=m.embed_dim, help="[%(default)s]")
    p.add_argument("--depth", type=int, default=m.depth, help="[%(default)s]")
    p.add_argument("--compile", action="store_true", help="torch.compile the model of the real step")
    p.add_argument("--storage", default=None, help="storage URL to time ask+tell on [a temporary journal file]")
    p.add_argument("--storage-procs", type=int, default=8, help="concurrent processes [%(default)s]")
    p.add_argument("--storage-ops", type=int, default=20, help="ask+tell pairs per process [%(default)s]")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run [all]")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nkat-search", description="Two-stage Optuna search for the NKAT Vision Transformer.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train one configuration on one dataset and print the result",
                       description="Train one NKAT ViT configuration on one dataset; evaluate the EMA weights "
                                   "on the validation split after every epoch.")
    _flag(p, "dataset", default="cifar10", help="cifar10, mnist, fashion_mnist or emnist_letters [%(default)s]")
    _flag(p, "device", default="auto", help="auto, cpu, cuda or cuda:N [%(default)s]")
    _flag(p, "eval_test", action="store_true", help="also evaluate on the test set (kept out of model selection)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary line")
    _add_model_flags(p)
    _add_train_flags(p)
    _add_data_flags(p)
    p.set_defaults(func=cmd_train)

    study_name_help = "study name [$NKAT_SEARCH_STUDY, or the only study in the storage]"
    p = sub.add_parser("start", help="create (or resume) a study from a study file and run its trials",
                       description="Create the study described by a study file, or resume it when the storage holds "
                                   "the same definition; record the trial budget; run trials until the study holds "
                                   "that many finished (complete + pruned) trials across all workers.")
    p.add_argument("--study", default="round2",
                   help="a packaged study (round2, smoke; see `nkat-search studies`) or a study file [%(default)s]")
    p.add_argument("--trials", type=int, default=None, help="trial budget of the study [the file's study.trials]")
    _add_storage_flags(p, None)
    _add_run_flags(p, "worker processes to run here; 0 = create or update the study only [1, or one per --gpus]")
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("worker", help="attach to an existing study and run trials until its budget is reached",
                       description="Attach to a study made by `start` and run trials until it holds its budget of "
                                   "finished trials; any number of workers on any hosts share one budget.")
    _add_storage_flags(p, study_name_help)
    _add_run_flags(p, "worker processes to run here [one per --gpus device]")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("leaderboard", help="completed trials ranked by Global TPE")
    _add_storage_flags(p, study_name_help)
    p.add_argument("--top", type=int, default=None, help="show the best N only [all]")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="[%(default)s]")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("status", help="trial counts by state, budget, workers, and compute saved by pruning")
    _add_storage_flags(p, study_name_help)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("export", help="write every trial with every parameter and attribute to CSV or Parquet")
    _add_storage_flags(p, study_name_help)
    p.add_argument("--out", required=True, help="output file; .csv or .parquet")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("dashboard", help="serve optuna-dashboard on the storage (localhost by default)")
    _add_storage_flags(p, None)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 exposes it to the network [%(default)s]")
    p.add_argument("--port", type=int, default=8080, help="[%(default)s]")
    p.set_defaults(func=cmd_dashboard)

    _add_bench_parser(sub)

    p = sub.add_parser("report", help="retrain the best trials for the full budget and score Stage 2 on the test sets",
                       description="Retrain the best completed trials with the study's report budget on every "
                                   "dataset, evaluate once on the test splits, print the Stage-2 table against the "
                                   "research's targets, and write report.json, report.md and the weights.")
    _add_storage_flags(p, study_name_help)
    p.add_argument("--top", type=int, default=1, help="retrain the best N completed trials [%(default)s]")
    p.add_argument("--epochs", type=int, default=None, help="epochs per dataset [the study's report.epochs]")
    p.add_argument("--out", default=None, help="output folder; holds state for resuming [reports/<study>]")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [%(default)s]")
    p.add_argument("--artifacts", default="artifacts",
                   help="folder of the Optuna file-system artifact store for the weights [%(default)s]")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("plots", help="write the search's plots as HTML and PNG and attach them to optuna-dashboard",
                       description="Optimisation history, parameter importances, embed_dim x depth contour, Stage-1 "
                                   "Local TPE with the gate, Stage-1 learning curves of pruned vs kept trials, and "
                                   "per-dataset accuracy of the top trials.")
    _add_storage_flags(p, study_name_help)
    p.add_argument("--out", default=None, help="output folder [reports/<study>/plots]")
    p.add_argument("--no-png", action="store_true", help="HTML only (PNG needs kaleido and Chromium)")
    p.add_argument("--no-dashboard", action="store_true", help="do not attach the figures to the study")
    p.set_defaults(func=cmd_plots)

    p = sub.add_parser("attention", help="class-token attention maps of a retrained trial over validation images",
                       description="PNG maps of the class-token attention of every layer over validation images, "
                                   "from the weights `nkat-search report` saved for the trial.")
    _add_storage_flags(p, study_name_help)
    p.add_argument("--trial", type=int, required=True, help="trial number (retrained by `nkat-search report`)")
    p.add_argument("--dataset", default="cifar10", help="dataset of the retrained model [%(default)s]")
    p.add_argument("--images", type=int, default=10, help="validation images to draw [%(default)s]")
    p.add_argument("--out", default=None, help="output folder [reports/<study>/attention-trial-N-<dataset>]")
    p.add_argument("--artifacts", default="artifacts",
                   help="folder of the artifact store that `nkat-search report` used [%(default)s]")
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("studies", help="list the packaged study files, or copy one out as a starting point",
                       description="List the study files shipped with nkat-search (pass a name to --study), or copy "
                                   "one to a file of your own to edit.")
    p.add_argument("--copy", nargs=2, metavar=("NAME", "FILE"), help="copy the packaged study NAME to FILE")
    p.set_defaults(func=cmd_studies)

    p = sub.add_parser("download", help="download the real datasets once (e.g. into a shared volume)")
    p.add_argument("--data-root", help="folder for the datasets [$NKAT_SEARCH_DATA_ROOT or ./data]")
    p.add_argument("--datasets", nargs="+", default=["cifar10", "mnist", "fashion_mnist", "emnist_letters"],
                   help="[all four]")
    p.set_defaults(func=cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    from .train import NonFiniteLossError
    from .storage import StorageUnavailable
    from .worker import WorkerStopped

    try:
        return args.func(args)
    except UsageError as exc:
        print(f"nkat-search: error: {exc}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, WorkerStopped, StorageUnavailable) as exc:
        print(f"nkat-search: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nkat-search: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
