"""One function per command: flags in, library calls, lines out."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
from pathlib import Path

from .. import settings
from ..config import DataConfig, ModelConfig, UsageError

log = logging.getLogger("nkat_search")
MODEL_DEFAULTS = ModelConfig()


DATASET_FIELDS = ("in_chans", "img_size", "num_classes")


def data_root_default() -> str:
    return settings.given("NKAT_SEARCH_DATA_ROOT") or "data"


def _data_root(args) -> str | None:
    """--data-root, else $NKAT_SEARCH_DATA_ROOT, else None (the study file's data.root)."""
    return args.data_root or settings.given("NKAT_SEARCH_DATA_ROOT")


def safe_name(name: str) -> str:
    """A study name as one path component: separators and leading dots cannot leave the folder."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "study"


def _open(args, create: bool = True):
    from ..storage import backends, urls

    url = urls.resolve_url(args.storage)
    return url, backends.open_storage(url, create=create)


def _attach(args):
    from ..search import studies
    from ..storage import backends, urls

    url = urls.resolve_url(args.storage)
    store = backends.open_storage(url, create=False)
    study, config = studies.attach(store, url, args.study or settings.given("NKAT_SEARCH_STUDY"))
    return url, study, config


def _plan(args) -> tuple[list[str], int]:
    """(devices, worker processes) from --gpus and --workers; checked before the storage is touched."""
    from ..devices import parse_gpus

    if args.max_failures < 1:
        raise UsageError(
            f"--max-failures must be at least 1, got {args.max_failures}; it is how many trials in a "
            "row may fail before a worker stops."
        )
    devices = parse_gpus(args.gpus)
    if args.trials_per_gpu is not None and args.workers is not None:
        raise UsageError(
            "--workers and --trials-per-gpu both set the number of trial processes; give one of them "
            "(--trials-per-gpu K runs K per device of --gpus)."
        )
    per_gpu = args.trials_per_gpu or 1
    count = args.workers if args.workers is not None else per_gpu * len(devices)
    if count < 0:
        raise UsageError(f"--workers must be >= 0, got {count}.")
    return devices, count


def _check_fit(study, plan: tuple[list[str], int]) -> None:
    """More than one trial process on a GPU: refused where the study's measured peaks say they do not fit."""
    from ..search import memory

    memory.check_fit(memory.per_device(*plan), lambda: memory.largest_peak(study), memory.gpu_total_mib)


def _run(url: str, study_name: str, args, plan: tuple[list[str], int]) -> int:
    from ..search import processes, signals, worker

    devices, count = plan
    if count == 0:
        return 0
    if count == 1:
        signals.install_signal_handlers()
        return worker.run_worker(
            url, study_name, devices[0], max_failures=args.max_failures, data_root=_data_root(args)
        )
    return processes.run_processes(url, study_name, devices, count, args.verbose, _data_root(args), args.max_failures)


def cmd_start(args) -> int:
    from ..search.study_file import load_study

    config = load_study(args.study)
    budget = args.trials if args.trials is not None else config.trials
    if budget < 1:
        raise UsageError(f"--trials must be at least 1, got {budget}.")
    from ..storage import backends, urls

    backends.check_storage(urls.resolve_url(args.storage))
    plan = _plan(args)
    # Imported after the study file, the storage and the flags are checked: a mistake there is told
    # in a fraction of a second, not after the seconds torch and the data take.
    from ..data.files import ensure_available
    from ..outputs import dashboard
    from ..search import studies

    data = dataclasses.replace(config.data, root=_data_root(args) or config.data.root)
    for dataset in config.datasets:
        ensure_available(dataset, data)
    if args.warm_start_from is not None:  # before the storage is created: a mistake there writes nothing
        studies.check_warm_start_source(urls.resolve_url(args.storage), config, args.warm_start_from)
    url, store = _open(args)
    log.info("storage: %s", urls.mask(url))
    study = studies.create_or_resume(store, url, config, budget, warm_start_from=args.warm_start_from)
    dashboard.annotate_study(study)
    log.info(
        "study %r: budget %d trials (%d finished so far)",
        config.name,
        budget,
        sum(
            t.state.name in ("COMPLETE", "PRUNED") and not studies.is_warm_start(t)
            for t in study.get_trials(deepcopy=False)
        ),
    )
    _check_fit(study, plan)
    code = _run(url, config.name, args, plan)
    if code == 0 and args.workers != 0:
        _print_status(study, config)
    return code


def cmd_worker(args) -> int:
    from ..storage import urls

    plan = _plan(args)
    url, study, _ = _attach(args)
    log.info("storage: %s", urls.mask(url))
    _check_fit(study, plan)
    return _run(url, study.study_name, args, plan)


def _print_status(study, config) -> None:
    from ..outputs.tables import format_status, status

    print(format_status(status(study, config)))


def cmd_status(args) -> int:
    from ..outputs.tables import format_status, status

    _, study, config = _attach(args)
    s = status(study, config)
    print(json.dumps(s) if args.json else format_status(s))
    return 0


def cmd_leaderboard(args) -> int:
    from ..outputs.tables import format_leaderboard, format_pareto, leaderboard, pareto

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
    from ..outputs.tables import export

    out = Path(args.out)
    if not out.parent.is_dir():
        raise UsageError(
            f"cannot write {out}: the folder {out.parent} does not exist; create it or pass another --out."
        )
    _, study, _ = _attach(args)
    rows = export(study, args.out)
    print(f"wrote {rows} trials to {args.out}")
    return 0


def cmd_dashboard(args) -> int:
    from ..outputs.dashboard import serve

    if args.port > 65535:
        raise UsageError(f"--port {args.port} is not a TCP port; use 1-65535 (0 picks a free one).")
    _listen_address(args.host, args.port)
    _, store = _open(args, create=False)
    try:
        serve(store, host=args.host, port=args.port, artifacts=args.artifacts)
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UsageError(
                f"--host {args.host!r} is not an address of this machine ({exc.strerror}); pass one of "
                "its addresses, 127.0.0.1 (this machine only) or 0.0.0.0 (every network)."
            ) from None
        raise
    return 0


def _listen_address(host: str, port: int) -> None:
    """--host names an address (or a name that resolves to one), or a UsageError says which is wrong."""
    import socket

    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, ValueError) as exc:  # gaierror; UnicodeError for a name idna cannot encode
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise UsageError(
            f"--host {host!r} is not an address or a host name that resolves ({reason}); pass an "
            "address of this machine, 127.0.0.1 (this machine only) or 0.0.0.0 (every network)."
        ) from None


def cmd_report(args) -> int:
    from ..devices import resolve_device
    from ..outputs.official import build_report, format_markdown
    from ..search.hostshare import HostShare

    url, study, config = _attach(args)
    out = args.out or os.path.join("reports", safe_name(study.study_name))
    device = resolve_device(args.device)
    # The report retrains like a worker: it takes its share of the host's cores, as workers do
    # (with workers or other programs busy, every core's worth of threads would stall each other).
    with HostShare(str(device)) as share:
        share.threads_for_next_trial()
        report = build_report(
            study,
            config,
            top=args.top,
            epochs=args.epochs,
            out=out,
            device=device,
            artifacts=args.artifacts,
            storage_url=url,
        )
    print(format_markdown(report), end="")
    print(f"wrote {os.path.join(out, 'report.json')} and {os.path.join(out, 'report.md')}")
    return 0


def cmd_plots(args) -> int:
    from ..outputs.plots import write_plots

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
    from ..outputs.attention import attention

    _, study, config = _attach(args)
    out = args.out or os.path.join(
        "reports", safe_name(study.study_name), f"attention-trial-{args.trial}-{safe_name(args.dataset)}"
    )
    paths = attention(study, config, args.trial, args.dataset, args.images, out, args.artifacts)
    print(f"wrote {len(paths) - 1} attention maps and a summary to {out}")
    return 0


def cmd_bench(args) -> int:
    from ..bench.measure import measure
    from ..bench.options import BenchOptions
    from ..bench.tables import table

    result = measure(BenchOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchOptions)}))
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


def cmd_augment(args) -> int:
    from ..data.loader import load_splits
    from ..outputs.preview import recipe_text, write_grid
    from ..search.study_file import load_study

    config = load_study(args.study)
    if args.dataset not in config.datasets:
        raise UsageError(
            f"dataset {args.dataset} is not in study {config.name} ({', '.join(config.datasets)}); pick one of those."
        )
    out = Path(args.out or f"augment-{safe_name(config.name)}-{args.dataset}.png")
    if not out.parent.is_dir():
        raise UsageError(
            f"cannot write {out}: the folder {out.parent} does not exist; create it or pass another --out."
        )
    _, train_cfg = config.configs_for({}, args.dataset, 1)
    data = dataclasses.replace(config.data, root=_data_root(args) or config.data.root)
    splits = load_splits(args.dataset, data, "cpu")
    write_grid(
        train_cfg,
        splits,
        out,
        rows=args.rows,
        cols=args.cols,
        seed=args.seed,
        title=f"{config.name} / {args.dataset}: {recipe_text(train_cfg)}",
    )
    print(
        f"wrote {out}: {args.rows * args.cols} {args.dataset} training images as the model sees them "
        f"({recipe_text(train_cfg)})"
    )
    return 0


def cmd_studies(args) -> int:
    from ..search.study_file import load_study, packaged_studies, study_path

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
        print(
            f"{name:8s} {config.trials:3d} trials, gate {config.gate:g} on {config.stage1_dataset}, "
            f"{len(config.space)} searched parameters, data {config.data.source}"
        )
    return 0


def cmd_download(args) -> int:
    from ..data.files import ensure_available

    data = DataConfig(source="torchvision", root=args.data_root or data_root_default())
    for dataset in args.datasets:
        ensure_available(dataset, data)
        print(f"{dataset}: ready under {data.root}/")
    return 0
