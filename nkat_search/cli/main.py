"""The command line. Parses flags into config objects and calls the library; no logic of its own.

Every parser lives here. The flags of `train` are generated from the fields of ModelConfig,
TrainConfig and DataConfig (their help metadata), so a flag and a study-file key cannot disagree.
Errors reach the user as one sentence: UsageError (exit 2), runtime failures (exit 1), OS errors
(a port in use, a folder that does not exist: exit 1 with the path), an interrupt (exit 130).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import typing

from .. import configure_logging, datasets, settings
from ..config import RuntimeFailure, UsageError
from .commands import (
    cmd_attention,
    cmd_augment,
    cmd_dashboard,
    cmd_download,
    cmd_export,
    cmd_leaderboard,
    cmd_plots,
    cmd_report,
    cmd_start,
    cmd_status,
    cmd_studies,
    cmd_worker,
)
from .flags import (
    _add_run_flags,
    _add_storage_flags,
    _bench_flags,
    _flag,
    _number,
)
from .training import add_train_parser

log = logging.getLogger("nkat_search")


class _Parser(argparse.ArgumentParser):
    """argparse with our error line, and with flags that a builder adds when the parser is first
    used (the bench command's flags come from bench.py, which imports torch)."""

    build: typing.Callable[[argparse.ArgumentParser], None] | None = None

    def error(self, message: str) -> typing.NoReturn:  # argparse's own errors: one sentence, exit 2
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


STUDY_NAME_HELP = "study name [$NKAT_SEARCH_STUDY, or the only study in the storage]"


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; the commands in the order `nkat-search --help` lists them."""
    parser = _Parser(prog="nkat-search", description="Two-stage Optuna search for the NKAT Vision Transformer.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_train_parser(sub)
    _add_start_parser(sub)
    _add_worker_parser(sub)
    _add_leaderboard_parser(sub)
    _add_status_parser(sub)
    _add_export_parser(sub)
    _add_dashboard_parser(sub)
    _add_bench_parser(sub)
    _add_report_parser(sub)
    _add_plots_parser(sub)
    _add_attention_parser(sub)
    _add_augment_parser(sub)
    _add_studies_parser(sub)
    _add_download_parser(sub)
    return parser


def _add_start_parser(sub) -> None:
    p = sub.add_parser(
        "start",
        help="create (or resume) a study from a study file and run its trials",
        description="Create the study described by a study file, or resume it when the storage holds "
        "the same definition; record the trial budget; run trials until the study holds "
        "that many finished (complete + pruned) trials across all workers.",
    )
    p.add_argument(
        "--study",
        default="round2",
        help="a packaged study (round2, smoke; see `nkat-search studies`) or a study file [%(default)s]",
    )
    p.add_argument(
        "--trials", type=_number(int, "int"), default=None, help="trial budget of the study [the file's study.trials]"
    )
    p.add_argument(
        "--warm-start-from",
        metavar="NAME",
        default=None,
        help="add the completed trials of an earlier study in the same storage to the sampler's history "
        "(they are not run again and do not count against the budget)",
    )
    _add_storage_flags(p, None)
    _add_run_flags(p, "worker processes to run here; 0 = create or update the study only [1, or one per --gpus]")
    p.set_defaults(func=cmd_start)


def _add_worker_parser(sub) -> None:
    p = sub.add_parser(
        "worker",
        help="attach to an existing study and run trials until its budget is reached",
        description="Attach to a study made by `start` and run trials until it holds its budget of "
        "finished trials; any number of workers on any hosts share one budget.",
    )
    _add_storage_flags(p, STUDY_NAME_HELP)
    _add_run_flags(p, "worker processes to run here [one per --gpus device]")
    p.set_defaults(func=cmd_worker)


def _add_leaderboard_parser(sub) -> None:
    p = sub.add_parser("leaderboard", help="completed trials ranked by Global TPE")
    _add_storage_flags(p, STUDY_NAME_HELP)
    p.add_argument("--top", type=_number(int, "int", 1), default=None, help="show the best N only [all]")
    p.add_argument(
        "--format",
        choices=["table", "csv", "json"],
        default="table",
        help="table: 100 columns wide; csv and json: every column [%(default)s]",
    )
    p.add_argument("--wide", action="store_true", help="the table with every column (parameters, TPE, params)")
    p.add_argument(
        "--pareto",
        action="store_true",
        help="instead of the ranking: the trials on the Pareto front of mean accuracy against lambda, "
        "smallest first (--top does not apply)",
    )
    p.set_defaults(func=cmd_leaderboard)


def _add_status_parser(sub) -> None:
    p = sub.add_parser("status", help="trial counts by state, budget, workers, and compute saved by pruning")
    _add_storage_flags(p, STUDY_NAME_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_status)


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="write every trial with every parameter and attribute to CSV or Parquet")
    _add_storage_flags(p, STUDY_NAME_HELP)
    p.add_argument("--out", required=True, help="output file; .csv or .parquet")
    p.set_defaults(func=cmd_export)


def _add_dashboard_parser(sub) -> None:
    p = sub.add_parser("dashboard", help="serve optuna-dashboard on the storage (localhost by default)")
    _add_storage_flags(p, None)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 exposes it to the network [%(default)s]"
    )
    p.add_argument("--port", type=_number(int, "int", 0), default=8080, help="[%(default)s]")
    p.add_argument(
        "--artifacts",
        default=settings.given("NKAT_SEARCH_ARTIFACTS"),
        help="folder of the artifact store that `nkat-search report` writes the weights to [$NKAT_SEARCH_ARTIFACTS or artifacts]",
    )
    p.set_defaults(func=cmd_dashboard)


def _add_bench_parser(sub) -> None:
    """`bench`: one flag per field of bench.BenchOptions (its type and help metadata), added when the
    command is used, so that other commands do not import torch."""
    p = sub.add_parser(
        "bench",
        help="measure training, augmentation, evaluation and search speed, storage latency and memory",
        description="Images per second of the real training step (TrainStep over BatchLoader) beside the bare "
        "model step and the research-style pipeline, measured side by side in one run; batched vs "
        "per-image PIL augmentation; evaluation; ask+tell latency of a storage; peak memory. By name: ops "
        "(the aten ops one batch's augmentation and training step dispatch, and the sync-prone ones among them); "
        "slow sections: search (where each trial's time goes), share (concurrent CPU workers with "
        "and without host sharing), procs (concurrent processes on one device). Figures are medians "
        "over --repeats rounds on synthetic CIFAR-10-shaped data; the precision used is printed with why.",
    )
    p.build = _bench_flags


def _add_report_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="retrain the best trials for the full budget and score Stage 2 on the test sets",
        description="Retrain the best completed trials with the study's report budget on every "
        "dataset, evaluate once on the test splits, print the Stage-2 table against the "
        "research's targets, and write report.json, report.md and the weights.",
    )
    _add_storage_flags(p, STUDY_NAME_HELP)
    p.add_argument(
        "--top", type=_number(int, "int", 1), default=1, help="retrain the best N completed trials [%(default)s]"
    )
    p.add_argument(
        "--epochs", type=_number(int, "int", 1), default=None, help="epochs per dataset [the study's report.epochs]"
    )
    p.add_argument("--out", default=None, help="output folder; holds state for resuming [reports/<study>]")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps [%(default)s]")
    p.add_argument(
        "--artifacts",
        default=settings.given("NKAT_SEARCH_ARTIFACTS"),
        help="folder of the Optuna file-system artifact store for the weights [$NKAT_SEARCH_ARTIFACTS or artifacts]",
    )
    p.set_defaults(func=cmd_report)


def _add_plots_parser(sub) -> None:
    p = sub.add_parser(
        "plots",
        help="write the search's plots as HTML and PNG and attach them to optuna-dashboard",
        description="Optimisation history, parameter importances, embed_dim x depth contour, Stage-1 "
        "Local TPE with the gate, Stage-1 learning curves of pruned vs kept trials, and "
        "per-dataset accuracy of the top trials.",
    )
    _add_storage_flags(p, STUDY_NAME_HELP)
    p.add_argument("--out", default=None, help="output folder [reports/<study>/plots]")
    p.add_argument("--no-png", action="store_true", help="HTML only (PNG needs kaleido and Chromium)")
    p.add_argument("--no-dashboard", action="store_true", help="do not attach the figures to the study")
    p.set_defaults(func=cmd_plots)


def _add_attention_parser(sub) -> None:
    p = sub.add_parser(
        "attention",
        help="class-token attention maps of a retrained trial over validation images",
        description="PNG maps of the class-token attention of every layer over validation images, "
        "from the weights `nkat-search report` saved for the trial.",
    )
    _add_storage_flags(p, STUDY_NAME_HELP)
    p.add_argument(
        "--trial", type=_number(int, "int"), required=True, help="trial number (retrained by `nkat-search report`)"
    )
    p.add_argument(
        "--dataset", default="cifar10", choices=datasets.NAMES, help="dataset of the retrained model [%(default)s]"
    )
    p.add_argument("--images", type=_number(int, "int", 1), default=10, help="validation images to draw [%(default)s]")
    p.add_argument("--out", default=None, help="output folder [reports/<study>/attention-trial-N-<dataset>]")
    p.add_argument(
        "--artifacts",
        default=settings.given("NKAT_SEARCH_ARTIFACTS"),
        help="folder of the artifact store that `nkat-search report` used [$NKAT_SEARCH_ARTIFACTS or artifacts]",
    )
    p.set_defaults(func=cmd_attention)


def _add_augment_parser(sub) -> None:
    p = sub.add_parser(
        "augment",
        help="write a PNG grid of training images as a trial's model sees them",
        description="One augmented training batch of a dataset under a study's recipe for that "
        "dataset (every augmentation, before normalisation), with labels or label mixes. "
        "Searched recipe parameters are at their fixed or default values.",
    )
    p.add_argument("--study", default="round2", help="a packaged study or a study file [%(default)s]")
    _flag(p, "dataset", default="cifar10", choices=datasets.NAMES, help="[%(default)s]")
    p.add_argument("--out", default=None, help="PNG file [augment-<study>-<dataset>.png]")
    p.add_argument("--rows", type=_number(int, "int", 1), default=6, help="[%(default)s]")
    p.add_argument("--cols", type=_number(int, "int", 1), default=8, help="[%(default)s]")
    p.add_argument(
        "--seed", type=_number(int, "int"), default=0, help="seed of the batch and its augmentation [%(default)s]"
    )
    p.add_argument(
        "--data-root", help="where the real datasets lie [$NKAT_SEARCH_DATA_ROOT, else the study's data.root]"
    )
    p.set_defaults(func=cmd_augment)


def _add_studies_parser(sub) -> None:
    p = sub.add_parser(
        "studies",
        help="list the packaged study files, or copy one out as a starting point",
        description="List the study files shipped with nkat-search (pass a name to --study), or copy "
        "one to a file of your own to edit.",
    )
    p.add_argument("--copy", nargs=2, metavar=("NAME", "FILE"), help="copy the packaged study NAME to FILE")
    p.set_defaults(func=cmd_studies)


def _add_download_parser(sub) -> None:
    p = sub.add_parser("download", help="download the real datasets once (e.g. into a shared volume)")
    p.add_argument("--data-root", help="folder for the datasets [$NKAT_SEARCH_DATA_ROOT or ./data]")
    p.add_argument("--datasets", nargs="+", default=list(datasets.NAMES), choices=datasets.NAMES, help="[all four]")
    p.set_defaults(func=cmd_download)


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
            print(
                "nkat-search: error: the standard output is closed (>&-?); run the command with an open "
                "output, or redirect it to /dev/null to drop what it prints.",
                file=sys.stderr,
            )
        return 1
    from ..devices import enable_mps_fallback

    enable_mps_fallback()  # before torch is imported: torch reads it once
    try:
        # Inside the try: parsing `bench` imports torch for its flags, a few seconds a Ctrl-C can land in.
        args = build_parser().parse_args(argv)
        configure_logging(args.verbose)
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
