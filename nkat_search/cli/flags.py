"""Flags generated from dataclass fields (type, default and help metadata), and the small argparse
types every command shares."""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing

from ..config import INT64


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
        if kind is int and not INT64[0] <= value <= INT64[1]:  # as in a study file: storages keep 64 bits
            raise argparse.ArgumentTypeError(
                f"{text} does not fit in 64 bits; use a whole number from {INT64[0]} to {INT64[1]}"
            )
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
                _flag(
                    group, f"no_{name}", dest=f.name, action="store_false", default=None, help=f"turn off: {help_text}"
                )
            else:
                _flag(group, name, dest=f.name, action="store_true", default=None, help=help_text)
        elif typing.get_origin(kind) is tuple:
            args = typing.get_args(kind)
            _flag(
                group,
                name,
                dest=f.name,
                type=_number(args[0], "int"),
                nargs=len(args),
                default=None,
                metavar=tuple("NM"[: len(args)]) if len(args) == 2 else None,
                help=help_text,
            )
        else:
            base = next((k for k in (int, float, str) if k is kind or k in typing.get_args(kind)), str)
            _flag(
                group,
                name,
                dest=f.name,
                type=str if base is str else _number(base, base.__name__),
                default=None,
                choices=f.metadata.get("choices"),
                help=help_text,
            )


def _given(cls, args, skip: tuple[str, ...] = ()) -> dict:
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if f.name not in skip and getattr(args, f.name, None) is not None
    }


def _add_storage_flags(p: argparse.ArgumentParser, study_help: str | None) -> None:
    p.add_argument(
        "--storage",
        help="Optuna storage URL, e.g. postgresql+psycopg://user:pass@host/db or "
        "journal:FILE [$NKAT_SEARCH_STORAGE or journal:nkat-search.journal]",
    )
    if study_help:
        p.add_argument("--study", help=study_help)


def _add_run_flags(p: argparse.ArgumentParser, workers_help: str) -> None:
    p.add_argument("--workers", type=_number(int, "int"), default=None, help=workers_help)
    p.add_argument(
        "--gpus",
        help="GPU indices for the trial processes, e.g. 0,1, or cpu or mps "
        "[every visible GPU, else MPS, else cpu]; --gpus 0 --workers 4 runs 4 trials on GPU 0",
    )
    p.add_argument(
        "--trials-per-gpu",
        type=_number(int, "int", 1),
        default=None,
        help="trial processes per device of --gpus, sharing it (instead of --workers); refused where the "
        "study's measured peak GPU memory says they cannot fit [1]",
    )
    p.add_argument(
        "--max-failures",
        type=_number(int, "int"),
        default=3,
        help="stop a worker after this many trials in a row failed (>= 1) [%(default)s]",
    )
    p.add_argument(
        "--data-root",
        help="where the real datasets lie on this host [$NKAT_SEARCH_DATA_ROOT, else the study file's data.root]",
    )


def _bench_flags(p: argparse.ArgumentParser) -> None:
    from ..bench.options import BenchOptions

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
        base = next(
            (
                k
                for k in (int, float, str)
                if k is kind
                or k in typing.get_args(kind)
                or any(k in typing.get_args(a) for a in typing.get_args(kind))
            ),
            str,
        )
        parse = str if base is str else _number(base, base.__name__)
        many = typing.get_origin(kind) is tuple or any(typing.get_origin(a) is tuple for a in typing.get_args(kind))
        p.add_argument(
            flag,
            dest=f.name,
            type=parse,
            nargs="+" if many else None,
            default=default,
            choices=f.metadata.get("choices"),
            metavar=f.name.upper() if many else None,
            help=help_text,
        )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")

    from .commands import cmd_bench

    p.set_defaults(func=cmd_bench)
