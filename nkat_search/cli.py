"""The command line. Parses flags into config objects and calls the library; no logic of its own.

Every parser lives here. The flags of `train` are generated from the fields of ModelConfig,
TrainConfig and DataConfig (their help metadata), so a flag and a study-file key cannot disagree.
Errors reach the user as one sentence: UsageError (exit 2), runtime failures (exit 1), OS errors
(a port in use, a folder that does not exist: exit 1 with the path), an interrupt (exit 130).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import re
import signal
import sys
import typing
from pathlib import Path

from .config import DataConfig, ModelConfig, RuntimeFailure, TrainConfig, UsageError, adapt_patch_size

log = logging.getLogger("nkat_search")
MODEL_DEFAULTS, TRAIN_DEFAULTS = ModelConfig(), TrainConfig()
DATASET_FIELDS = ("in_chans", "img_size", "num_classes")


class _Parser(argparse.ArgumentParser):
    """argparse with our error line, and with flags that a builder adds when the parser is first
    used (the bench command's flags come from bench.py, which imports torch)."""

    build: typing.Callable[[argparse.ArgumentParser], None] | None = None

    def error(self, message: str) -> None:  # argparse's own errors: one sentence, exit 2
        self.exit(2, f"nkat-search: error: {message}; see `{self.prog} --help`.\n")

    def _built(self) -> None:
        build, self.build = self.build, None
        if build is not None:
            build(self)

    def parse_known_args(self, args=None, namespace=None):
        self._built()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._built()
        return super().format_help()


def _flag(group, name: str, dest: str | None = None, **kwargs) -> None:
    """Add --name and, for snake_case names, its --kebab-case twin (both spellings welcome)."""
    spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    group.add_argument(*spellings, dest=dest or name, **kwargs)


def _number(kind: type, name: str, minimum: float | None = None):
    """An argparse type for int or float flags that refuses NaN, infinity and values below minimum."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is below the least allowed value, {minimum}")
        return value

    parse.__name__ = name
    return parse


def _config_flags(parser, title: str, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of a config dataclass, from its type and help metadata; every flag
    defaults to None (not given), so the dataclass's own default applies."""
    group = parser.add_argument_group(title)
    hints, defaults = typing.get_type_hints(cls), cls()
    for f in dataclasses.fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        name, default, kind = f.metadata.get("flag", f.name), getattr(defaults, f.name), hints[f.name]
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f"{f.metadata['help']} [{shown}]".replace("%", "%%")
        if kind is bool:
            if default:
                _flag(group, f"no_{name}", dest=f.name, action="store_false", default=None,
                      help=f"turn off: {help_text}")
            else:
                _flag(group, name, dest=f.name, action="store_true", default=None, help=help_text)
        elif typing.get_origin(kind) is tuple:
            args = typing.get_args(kind)
            _flag(group, name, dest=f.name, type=_number(args[0], "int"), nargs=len(args), default=None,
                  metavar=tuple("NM"[: len(args)]) if len(args) == 2 else None, help=help_text)
        else:
            base = next((k for k in (int, float, str) if k is kind or k in typing.get_args(kind)), str)
            _flag(group, name, dest=f.name, type=str if base is str else _number(base, base.__name__), default=None,
                  choices=f.metadata.get("choices"), help=help_text)


def _given(cls, args, skip: tuple[str, ...] = ()) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.name not in skip and getattr(args, f.name, None) is not None}


def data_root_default() -> str:
    return os.environ.get("NKAT_SEARCH_DATA_ROOT") or "data"


def _data_root(args) -> str | None:
    """--data-root, else $NKAT_SEARCH_DATA_ROOT, else None (the study file's data.root)."""
    return args.data_root or os.environ.get("NKAT_SEARCH_DATA_ROOT") or None


def safe_name(name: str) -> str:
    """A study name as one path component: separators and leading dots cannot leave the folder."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "study"


def cmd_train(args) -> int:
    from .data import get_spec, load_splits
    from .devices import resolve_device
    from .progress import TrainProgress
    from .train import OutOfMemory, fit, out_of_memory

    spec = get_spec(args.dataset)
    model_kwargs = _given(ModelConfig, args, DATASET_FIELDS)
    stem = model_kwargs.get("conv_stem", MODEL_DEFAULTS.conv_stem)
    model_kwargs.setdefault("patch_size", adapt_patch_size(spec.image_size, stem, MODEL_DEFAULTS.patch_size))
    model_cfg = ModelConfig(in_chans=spec.channels, img_size=spec.image_size, num_classes=spec.num_classes,
                            **model_kwargs)
    train_cfg = TrainConfig(**_given(TrainConfig, args))
    data_cfg = DataConfig(**{**_given(DataConfig, args), "root": args.root or data_root_default()})
    device = resolve_device(args.device)
    try:
        splits = load_splits(args.dataset, data_cfg, device)
        with TrainProgress(args.dataset, train_cfg.epochs) as on_epoch:  # a bar on a terminal, else a line per epoch
            result = fit(model_cfg, train_cfg, splits, on_epoch=on_epoch, eval_test=args.eval_test)
    except (MemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
        raise OutOfMemory(f"the model or the data does not fit in the memory of {device} ({type(exc).__name__}); "
                          "lower embed_dim, depth, batch_size or the number of images.") from None
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


def _open(args, create: bool = True):
    from . import storage

    url = storage.resolve_url(args.storage)
    return url, storage.open_storage(url, create=create)


def _attach(args):
    from . import storage

    url = storage.resolve_url(args.storage)
    store = storage.open_storage(url, create=False)
    study, config = storage.attach(store, url, args.study or os.environ.get("NKAT_SEARCH_STUDY") or None)
    return url, study, config


def _plan(args) -> tuple[list[str], int]:
    """(devices, worker processes) from --gpus and --workers; checked before the storage is touched."""
    from .devices import parse_gpus

    if args.max_failures < 1:
        raise UsageError(f"--max-failures must be at least 1, got {args.max_failures}; it is how many trials in a "
                         "row may fail before a worker stops.")
    devices = parse_gpus(args.gpus)
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
    return worker.run_processes(url, study_name, devices, count, args.verbose, _data_root(args), args.max_failures)


def cmd_start(args) -> int:
    from .study import load_study

    config = load_study(args.study)
    budget = args.trials if args.trials is not None else config.trials
    if budget < 1:
        raise UsageError(f"--trials must be at least 1, got {budget}.")
    plan = _plan(args)
    # Imported after the study file and flags are checked: a mistake there is told in a fraction of
    # a second, not after the seconds torch takes to import.
    from . import dashboard, storage
    from .data import ensure_available

    data = dataclasses.replace(config.data, root=_data_root(args) or config.data.root)
    for dataset in config.datasets:
        ensure_available(dataset, data)
    if args.warm_start_from is not None:  # before the storage is created: a mistake there writes nothing
        storage.check_warm_start_source(storage.resolve_url(args.storage), config, args.warm_start_from)
    url, store = _open(args)
    log.info("storage: %s", storage.mask(url))
    study = storage.create_or_resume(store, url, config, budget, warm_start_from=args.warm_start_from)
    dashboard.annotate_study(study)
    log.info("study %r: budget %d trials (%d finished so far)", config.name, budget,
             sum(t.state.name in ("COMPLETE", "PRUNED") and not storage.is_warm_start(t)
                 for t in study.get_trials(deepcopy=False)))
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
    from .report import format_leaderboard, format_pareto, leaderboard, pareto

    _, study, config = _attach(args)
    if args.pareto:
        frame = pareto(leaderboard(study, config), config)
        text = format_pareto(frame)
    else:
        frame = leaderboard(study, config, args.top)
        text = format_leaderboard(frame, config, wide=args.wide)
    if args.format == "json":
        print(frame.to_json(orient="records"))
    elif args.format == "csv":
        print(frame.to_csv(index=False), end="")
    else:
        print(text)
    return 0


def cmd_export(args) -> int:
    from .report import export

    out = Path(args.out)
    if not out.parent.is_dir():
        raise UsageError(f"cannot write {out}: the folder {out.parent} does not exist; create it or pass another --out.")
    _, study, _ = _attach(args)
    rows = export(study, args.out)
    print(f"wrote {rows} trials to {args.out}")
    return 0


def cmd_dashboard(args) -> int:
    from .dashboard import serve

    if args.port > 65535:
        raise UsageError(f"--port {args.port} is not a TCP port; use 1-65535 (0 picks a free one).")
    _listen_address(args.host, args.port)
    _, store = _open(args, create=False)
    try:
        serve(store, host=args.host, port=args.port, artifacts=args.artifacts)
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"--host {args.host!r} is not an address of this machine ({exc.strerror}); pass one of "
                             "its addresses, 127.0.0.1 (this machine only) or 0.0.0.0 (every network).") from None
        raise
    return 0


def _listen_address(host: str, port: int) -> None:
    """--host names an address (or a name that resolves to one), or a UsageError says which is wrong."""
    import socket

    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, ValueError) as exc:  # gaierror; UnicodeError for a name idna cannot encode
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise UsageError(f"--host {host!r} is not an address or a host name that resolves ({reason}); pass an "
                         "address of this machine, 127.0.0.1 (this machine only) or 0.0.0.0 (every network).") from None


def cmd_report(args) -> int:
    from .devices import resolve_device
    from .hostshare import HostShare
    from .retrain import build_report, format_markdown

    url, study, config = _attach(args)
    out = args.out or os.path.join("reports", safe_name(study.study_name))
    device = resolve_device(args.device)
    # The report retrains like a worker: it takes its share of the host's cores, as workers do
    # (with workers or other programs busy, every core's worth of threads would stall each other).
    with HostShare(str(device)) as share:
        share.threads_for_next_trial()
        report = build_report(study, config, top=args.top, epochs=args.epochs, out=out, device=device,
                              artifacts=args.artifacts, storage_url=url)
    print(format_markdown(report), end="")
    print(f"wrote {os.path.join(out, 'report.json')} and {os.path.join(out, 'report.md')}")
    return 0


def cmd_plots(args) -> int:
    from .plots import write_plots

    _, study, config = _attach(args)
    out = args.out or os.path.join("reports", safe_name(study.study_name), "plots")
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
    out = args.out or os.path.join("reports", safe_name(study.study_name),
                                   f"attention-trial-{args.trial}-{safe_name(args.dataset)}")
    paths = attention(study, config, args.trial, args.dataset, args.images, out, args.artifacts)
    print(f"wrote {len(paths) - 1} attention maps and a summary to {out}")
    return 0


def cmd_bench(args) -> int:
    from .bench import measure, table

    result = measure(args)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


def cmd_augment(args) -> int:
    from .data import load_splits
    from .preview import recipe_text, write_grid
    from .study import load_study

    config = load_study(args.study)
    if args.dataset not in config.datasets:
        raise UsageError(f"dataset {args.dataset} is not in study {config.name} ({', '.join(config.datasets)}); "
                         "pick one of those.")
    out = Path(args.out or f"augment-{safe_name(config.name)}-{args.dataset}.png")
    if not out.parent.is_dir():
        raise UsageError(f"cannot write {out}: the folder {out.parent} does not exist; create it or pass another --out.")
    _, train_cfg = config.configs_for({}, args.dataset, 1)
    data = dataclasses.replace(config.data, root=args.data_root or os.environ.get("NKAT_SEARCH_DATA_ROOT")
                               or config.data.root)
    splits = load_splits(args.dataset, data, "cpu")
    write_grid(train_cfg, splits, out, rows=args.rows, cols=args.cols, seed=args.seed,
               title=f"{config.name} / {args.dataset}: {recipe_text(train_cfg)}")
    print(f"wrote {out}: {args.rows * args.cols} {args.dataset} training images as the model sees them "
          f"({recipe_text(train_cfg)})")
    return 0


def cmd_studies(args) -> int:
    from .study import load_study, packaged_studies, study_path

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
        config = load_study(str(path))
        print(f"{name:8s} {config.trials:3d} trials, gate {config.gate:g} on {config.stage1_dataset}, "
              f"{len(config.space)} searched parameters, data {config.data.source}")
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
    p.add_argument("--workers", type=_number(int, "int"), default=None, help=workers_help)
    p.add_argument("--gpus", help="GPU indices for the trial processes, e.g. 0,1, or cpu or mps "
                                  "[every visible GPU, else MPS, else cpu]; --gpus 0 --workers 4 runs 4 trials on GPU 0")
    p.add_argument("--max-failures", type=_number(int, "int"), default=3,
                   help="stop a worker after this many trials in a row failed (>= 1) [%(default)s]")
    p.add_argument("--data-root", help="where the real datasets lie on this host "
                                       "[$NKAT_SEARCH_DATA_ROOT, else the study file's data.root]")


def _add_bench_parser(sub) -> None:
    """`bench`: one flag per field of bench.BenchOptions (its type and help metadata), added when the
    command is used, so that other commands do not import torch."""
    p = sub.add_parser(
        "bench", help="measure training, augmentation, evaluation and search speed, storage latency and memory",
        description="Images per second of the real training step (TrainStep over BatchLoader) beside the bare "
                    "model step and the research-style pipeline, measured side by side in one run; batched vs "
                    "per-image PIL augmentation; evaluation; ask+tell latency of a storage; peak memory. Slow "
                    "sections by name: search (where each trial's time goes), share (concurrent CPU workers with "
                    "and without host sharing), procs (concurrent processes on one device). Figures are medians "
                    "over --repeats rounds on synthetic CIFAR-10-shaped data; the precision used is printed with why.")
    p.build = _bench_flags


def _bench_flags(p: argparse.ArgumentParser) -> None:
    from .bench import BenchOptions, measure, table

    hints, defaults = typing.get_type_hints(BenchOptions), BenchOptions()
    for f in dataclasses.fields(BenchOptions):
        kind, default = hints[f.name], getattr(defaults, f.name)
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f.metadata["help"]
        if default is not None and kind is not bool and not help_text.endswith("]"):
            help_text += f" [{shown}]"
        help_text = help_text.replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, dest=f.name, action="store_true", help=help_text)
            continue
        base = next((k for k in (int, float, str) if k is kind or k in typing.get_args(kind)
                     or any(k in typing.get_args(a) for a in typing.get_args(kind))), str)
        parse = str if base is str else _number(base, base.__name__)
        many = typing.get_origin(kind) is tuple or any(typing.get_origin(a) is tuple for a in typing.get_args(kind))
        p.add_argument(flag, dest=f.name, type=parse, nargs="+" if many else None, default=default,
                       choices=f.metadata.get("choices"), metavar=f.name.upper() if many else None, help=help_text)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")

    def run(args) -> int:
        result = measure(BenchOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchOptions)}))
        print(json.dumps(result, indent=2) if args.json else table(result))
        return 0

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nkat-search", description="Two-stage Optuna search for the NKAT Vision Transformer.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train one configuration on one dataset and print the result",
                       description="Train one NKAT ViT configuration on one dataset; evaluate the EMA weights "
                                   "on the validation split after every epoch.")
    _flag(p, "dataset", default="cifar10", choices=["cifar10", "mnist", "fashion_mnist", "emnist_letters"],
          help="[%(default)s]")
    _flag(p, "device", default="auto", help="auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps [%(default)s]")
    _flag(p, "eval_test", action="store_true", help="also evaluate on the test set (kept out of model selection)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary line")
    _config_flags(p, "model (defaults: the research's baseline)", ModelConfig, DATASET_FIELDS)
    _config_flags(p, "training recipe (defaults: the research's)", TrainConfig)
    _config_flags(p, "data", DataConfig)
    p.set_defaults(func=cmd_train)

    study_name_help = "study name [$NKAT_SEARCH_STUDY, or the only study in the storage]"
    p = sub.add_parser("start", help="create (or resume) a study from a study file and run its trials",
                       description="Create the study described by a study file, or resume it when the storage holds "
                                   "the same definition; record the trial budget; run trials until the study holds "
                                   "that many finished (complete + pruned) trials across all workers.")
    p.add_argument("--study", default="round2",
                   help="a packaged study (round2, smoke; see `nkat-search studies`) or a study file [%(default)s]")
    p.add_argument("--trials", type=_number(int, "int"), default=None,
                   help="trial budget of the study [the file's study.trials]")
    p.add_argument("--warm-start-from", metavar="NAME", default=None,
                   help="add the completed trials of an earlier study in the same storage to the sampler's history "
                        "(they are not run again and do not count against the budget)")
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
    p.add_argument("--top", type=_number(int, "int", 1), default=None, help="show the best N only [all]")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table",
                   help="table: 100 columns wide; csv and json: every column [%(default)s]")
    p.add_argument("--wide", action="store_true", help="the table with every column (parameters, TPE, params)")
    p.add_argument("--pareto", action="store_true",
                   help="instead of the ranking: the trials on the Pareto front of mean accuracy against lambda, "
                        "smallest first (--top does not apply)")
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
    p.add_argument("--port", type=_number(int, "int", 0), default=8080, help="[%(default)s]")
    p.add_argument("--artifacts", default=os.environ.get("NKAT_SEARCH_ARTIFACTS") or "artifacts",
                   help="folder of the artifact store that `nkat-search report` writes the weights to [$NKAT_SEARCH_ARTIFACTS or artifacts]")
    p.set_defaults(func=cmd_dashboard)

    _add_bench_parser(sub)

    p = sub.add_parser("report", help="retrain the best trials for the full budget and score Stage 2 on the test sets",
                       description="Retrain the best completed trials with the study's report budget on every "
                                   "dataset, evaluate once on the test splits, print the Stage-2 table against the "
                                   "research's targets, and write report.json, report.md and the weights.")
    _add_storage_flags(p, study_name_help)
    p.add_argument("--top", type=_number(int, "int", 1), default=1, help="retrain the best N completed trials [%(default)s]")
    p.add_argument("--epochs", type=_number(int, "int", 1), default=None, help="epochs per dataset [the study's report.epochs]")
    p.add_argument("--out", default=None, help="output folder; holds state for resuming [reports/<study>]")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps [%(default)s]")
    p.add_argument("--artifacts", default=os.environ.get("NKAT_SEARCH_ARTIFACTS") or "artifacts",
                   help="folder of the Optuna file-system artifact store for the weights [$NKAT_SEARCH_ARTIFACTS or artifacts]")
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
    p.add_argument("--trial", type=_number(int, "int"), required=True,
                   help="trial number (retrained by `nkat-search report`)")
    p.add_argument("--dataset", default="cifar10", help="dataset of the retrained model [%(default)s]")
    p.add_argument("--images", type=_number(int, "int", 1), default=10, help="validation images to draw [%(default)s]")
    p.add_argument("--out", default=None, help="output folder [reports/<study>/attention-trial-N-<dataset>]")
    p.add_argument("--artifacts", default=os.environ.get("NKAT_SEARCH_ARTIFACTS") or "artifacts",
                   help="folder of the artifact store that `nkat-search report` used [$NKAT_SEARCH_ARTIFACTS or artifacts]")
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("augment", help="write a PNG grid of training images as a trial's model sees them",
                       description="One augmented training batch of a dataset under a study's recipe for that "
                                   "dataset (every augmentation, before normalisation), with labels or label mixes. "
                                   "Searched recipe parameters are at their fixed or default values.")
    p.add_argument("--study", default="round2", help="a packaged study or a study file [%(default)s]")
    _flag(p, "dataset", default="cifar10", choices=["cifar10", "mnist", "fashion_mnist", "emnist_letters"],
          help="[%(default)s]")
    p.add_argument("--out", default=None, help="PNG file [augment-<study>-<dataset>.png]")
    p.add_argument("--rows", type=_number(int, "int", 1), default=6, help="[%(default)s]")
    p.add_argument("--cols", type=_number(int, "int", 1), default=8, help="[%(default)s]")
    p.add_argument("--seed", type=_number(int, "int"), default=0, help="seed of the batch and its augmentation [%(default)s]")
    p.add_argument("--data-root", help="where the real datasets lie [$NKAT_SEARCH_DATA_ROOT, else the study's data.root]")
    p.set_defaults(func=cmd_augment)

    p = sub.add_parser("studies", help="list the packaged study files, or copy one out as a starting point",
                       description="List the study files shipped with nkat-search (pass a name to --study), or copy "
                                   "one to a file of your own to edit.")
    p.add_argument("--copy", nargs=2, metavar=("NAME", "FILE"), help="copy the packaged study NAME to FILE")
    p.set_defaults(func=cmd_studies)

    p = sub.add_parser("download", help="download the real datasets once (e.g. into a shared volume)")
    p.add_argument("--data-root", help="folder for the datasets [$NKAT_SEARCH_DATA_ROOT or ./data]")
    p.add_argument("--datasets", nargs="+", default=["cifar10", "mnist", "fashion_mnist", "emnist_letters"],
                   choices=["cifar10", "mnist", "fashion_mnist", "emnist_letters"], help="[all four]")
    p.set_defaults(func=cmd_download)
    return parser


def _os_error(exc: OSError) -> str:
    what = exc.strerror or type(exc).__name__
    where = exc.filename or ""
    if isinstance(exc, OSError) and exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
        return f"the address is already in use ({what}); pick another --port or stop the program that holds it."
    if where:
        return f"cannot use {where} ({what}); check that the path exists and is writable."
    return f"{what}; check the files, folders and ports the command uses."


def main(argv: list[str] | None = None) -> int:
    if sys.stdout is None:  # `nkat-search status >&-`: every line printed would be lost without a word
        if sys.stderr is not None:
            print("nkat-search: error: the standard output is closed (>&-?); run the command with an open "
                  "output, or redirect it to /dev/null to drop what it prints.", file=sys.stderr)
        return 1
    from .devices import enable_mps_fallback

    enable_mps_fallback()  # before torch is imported: torch reads it once
    try:
        # Inside the try: parsing `bench` imports torch for its flags, a few seconds a Ctrl-C can land in.
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
        code = args.func(args)
        sys.stdout.flush()
        return code
    except UsageError as exc:
        print(f"nkat-search: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeFailure as exc:  # a diverging loss, a worker that gave up, a database gone, no memory
        print(f"nkat-search: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader of our output went away (`status | head`): nothing left to say to it.
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())
        print("nkat-search: the output was closed before everything was written (broken pipe).", file=sys.stderr)
        return 141
    except OSError as exc:
        print(f"nkat-search: error: {_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # From here on further Ctrl-C (and SIGTERM) are ignored, through the interpreter's shutdown
        # too: Python keeps an ignored signal ignored, where it would restore the default handler of
        # one it handled, and a late Ctrl-C would then kill the process or end in a traceback.
        for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
            if sig is not None:
                with contextlib.suppress(ValueError):  # not the main thread: no signal reaches it anyway
                    signal.signal(sig, signal.SIG_IGN)
        print("nkat-search: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
