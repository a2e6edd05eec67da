"""Properties of the edge: whatever a user writes into a study file or onto the `train` command line,
the answer is either "accepted, and every trial it can produce can be built" or one sentence (exit 2)
with nothing written to the storage; never a traceback, never a silent change.

Study files are made by mutating valid ones (the tiny study of conftest.py, the packaged smoke and
round2) with hypothesis: values of the wrong type (strings, booleans, lists, tables where numbers go
and numbers where tables go), non-finite and out-of-range numbers (TOML `nan`, `inf`), missing and
unknown keys, stepped ranges, unknown kinds. Each file goes through load_study and, in-process,
through `nkat-search start` on a fresh journal. Flag sets for `train` go through cli.main with the
data loading replaced by a stop, so no training runs. Deterministic (derandomize) for CI.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import math
import random
import re
import tempfile
import tomllib
from pathlib import Path
from unittest import mock

import optuna
import pytest
from helpers import ROOT, TINY_STUDY
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st

from nkat_search.cli import main as cli
from nkat_search.config import DataConfig, ModelConfig, TrainConfig, UsageError
from nkat_search.search.space import suggest
from nkat_search.search.study_file import StudyConfig, load_study

BASES = {
    "tiny": tomllib.loads(TINY_STUDY.format(name="tiny", trials=4, gate=0.01)),
    "smoke": tomllib.loads((ROOT / "nkat_search" / "studies" / "smoke.toml").read_text()),
    "round2": tomllib.loads((ROOT / "nkat_search" / "studies" / "round2.toml").read_text()),
}
SETTINGS = settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
MAX_COMBINATIONS = 60  # searched-value combinations checked per accepted file (all of them when fewer)
RANDOM_TRIALS = 3  # and this many trials drawn by Optuna, the way a worker draws them


# ---------------------------------------------------------------------------------------------
# TOML out (tomllib only reads)


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"


def to_toml(raw: dict) -> str:
    """A study file from its tables: top-level values first, then [section] tables, [[enqueue]]
    arrays of tables; tables inside a section are written inline."""
    lines = [
        f"{_key(k)} = {_value(v)}"
        for k, v in raw.items()
        if not isinstance(v, dict) and not (isinstance(v, list) and v and all(isinstance(e, dict) for e in v))
    ]
    for name, value in raw.items():
        if isinstance(value, dict):
            lines += ["", f"[{_key(name)}]"] + [f"{_key(k)} = {_value(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and all(isinstance(e, dict) for e in value):
            for entry in value:
                lines += ["", f"[[{_key(name)}]]"] + [f"{_key(k)} = {_value(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


def _same(a, b) -> bool:
    """Equality with nan equal to itself (what was written is what is read)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


# ---------------------------------------------------------------------------------------------
# Mutations


WORDS = [
    "",
    "abc",
    "tpe",
    "random",
    "median",
    "none",
    "hyperband",
    "int",
    "float",
    "categorical",
    "uniform",
    "cifar10",
    "mnist",
    "svhn",
    "tiny",
    "small",
    "off",
    "fp32",
    "0.6",
    "8",
    "true",
    "../x",
    "a b",
]
NUMBERS = [
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    16,
    64,
    -1,
    -8,
    2**31,
    2**63,
    0.0,
    0.5,
    1.0,
    1.5,
    -0.5,
    1e-300,
    1e300,
    math.nan,
    math.inf,
    -math.inf,
]
scalars = st.one_of(
    st.sampled_from(WORDS),
    st.booleans(),
    st.sampled_from(NUMBERS),
    st.integers(-3, 70),
    st.floats(-2, 70, allow_nan=False),
    st.text("abcxyz_-. \n", max_size=6),
)
# Keys a user can write (quoted TOML keys may hold anything, a line break too:
# test_an_unknown_key_with_a_line_break_is_named_on_one_line).
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.sampled_from(["x", "low", "high", "type", "lr", "kind"]), scalars, max_size=2),
)
new_keys = st.one_of(
    st.sampled_from(
        [
            "x",
            "warmpu",
            "lr",
            "seed",
            "epochs",
            "low",
            "step",
            "log",
            "choices",
            "kind",
            "datasets",
            "gate",
            "type",
            "name",
            "mnist",
            "train",
            "percentile",
        ]
    ),
    st.text("abcxyz_-. \n", min_size=1, max_size=6),
)


def _leaves(raw: dict, prefix: tuple = ()) -> list[tuple]:
    """Paths to every value: ("train", "lr"), ("space", "embed_dim", "low"), ("enqueue", 0, "lr"), ..."""
    out = []
    items = raw.items() if isinstance(raw, dict) else enumerate(raw)
    for key, value in items:
        path = (*prefix, key)
        out.append(path)
        if isinstance(value, dict) or (isinstance(value, list) and value and all(isinstance(v, dict) for v in value)):
            out += _leaves(value, path)
    return out


def _parent(raw, path):
    for key in path[:-1]:
        raw = raw[key]
    return raw


@st.composite
def mutation(draw, raw: dict):
    """Change raw in place one way; return a description for the failure report."""
    paths = _leaves(raw)
    kind = draw(
        st.sampled_from(["replace", "replace", "delete", "add", "range", "range", "kind", "tweak", "tweak", "tweak"])
    )
    numbers = [
        p
        for p in paths
        if isinstance(_parent(raw, p)[p[-1]], (int, float)) and not isinstance(_parent(raw, p)[p[-1]], bool)
    ]
    if kind == "tweak" and numbers:  # a plausible number of the same type: often still a valid file
        path = draw(st.sampled_from(numbers))
        old = _parent(raw, path)[path[-1]]
        choices = (
            [0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128] if isinstance(old, int) else [0.0, 0.05, 0.1, 0.5, 0.9, 1.0, 2.0]
        )
        _parent(raw, path)[path[-1]] = draw(st.sampled_from(choices))
        return f"{path} = {_parent(raw, path)[path[-1]]!r}"
    if kind == "replace" and paths:
        path = draw(st.sampled_from(paths))
        _parent(raw, path)[path[-1]] = draw(values)
        return f"{path} = {_parent(raw, path)[path[-1]]!r}"
    if kind == "delete" and paths:
        path = draw(st.sampled_from(paths))
        del _parent(raw, path)[path[-1]]
        return f"del {path}"
    if kind == "add":
        tables = [()] + [p for p in paths if isinstance(_parent(raw, p)[p[-1]], dict)]
        where = draw(st.sampled_from(tables))
        target = _parent(raw, (*where, None)) if where else raw
        key, value = draw(new_keys), draw(values)
        target[key] = value
        return f"{where}.{key} = {value!r}"
    if kind == "range" and isinstance(raw.get("space"), dict) and raw["space"]:
        name = draw(st.sampled_from(sorted(raw["space"])))
        spec = {
            "type": draw(st.sampled_from(["int", "int", "float"])),
            "low": draw(st.sampled_from([0, 1, 2, 4, 8, 16, 0.05, 0.5])),
            "high": draw(st.sampled_from([2, 3, 4, 8, 16, 20, 64, 100, 1.0, 1.5])),
        }
        if draw(st.booleans()):
            spec["step"] = draw(st.sampled_from([1, 2, 3, 6, 7, 8, 0.5, 0, -1]))
        if draw(st.booleans()):
            spec["log"] = draw(st.sampled_from([True, False, 1]))
        raw["space"][name] = spec
        return f"space.{name} = {spec!r}"
    section = draw(st.sampled_from(["sampler", "pruner", "space"]))
    if section == "space" and isinstance(raw.get("space"), dict) and raw["space"]:
        name = draw(st.sampled_from(sorted(raw["space"])))
        if isinstance(raw["space"][name], dict):
            raw["space"][name]["type"] = draw(st.one_of(st.sampled_from(WORDS), values))
            return f"space.{name}.type = {raw['space'][name]['type']!r}"
    if isinstance(raw.get(section), dict):
        raw[section]["kind"] = draw(st.one_of(st.sampled_from(WORDS), values))
        return f"{section}.kind = {raw[section]['kind']!r}"
    return "no change"


@st.composite
def study_files(draw):
    base = draw(st.sampled_from(sorted(BASES)))
    raw = copy.deepcopy(BASES[base])
    done = [draw(mutation(raw)) for _ in range(draw(st.integers(1, 3)))]
    return base, raw, done


# ---------------------------------------------------------------------------------------------
# What "accepted" must mean


def _grid(p) -> list:
    """The values Optuna can give a parameter, independently of study.py: every choice; every int of
    a range up to 300 values (log or not); the ends and the middle of a float range."""
    if p.type == "categorical":
        return list(p.choices)
    if p.type == "int":
        step = 1 if p.log else int(p.step or 1)
        count = (int(p.high) - int(p.low)) // step + 1
        if count <= 300:
            return list(range(int(p.low), int(p.high) + 1, step))
        return sorted(
            {
                int(p.low),
                int(p.low) + step,
                int(p.high) - (int(p.high) - int(p.low)) % step,
                int(p.low) + step * (count // 2),
            }
        )
    if p.step:
        top = p.low + p.step * math.floor((p.high - p.low) / p.step + 1e-9)
        return [p.low, (p.low + top) / 2, top]
    middle = math.sqrt(p.low * p.high) if p.log else (p.low + p.high) / 2
    return [p.low, middle, p.high]


def trials_that_cannot_be_built(config: StudyConfig) -> list[str]:
    """Searched-value combinations (all, or MAX_COMBINATIONS of them at random) and RANDOM_TRIALS trials
    drawn by Optuna whose model or recipe is refused on some dataset of the study."""
    grids = [[(p.name, v) for v in _grid(p)] for p in config.space]
    total = math.prod(len(g) for g in grids)
    rng = random.Random(0)
    combos = (
        itertools.product(*grids)
        if total <= MAX_COMBINATIONS
        else (tuple(rng.choice(g) for g in grids) for _ in range(MAX_COMBINATIONS))
    )
    params = [dict(c) for c in combos]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(RANDOM_TRIALS):
        params.append(suggest(study.ask(), config))
    params += [dict({p.name: _grid(p)[0] for p in config.space}, **e) for e in config.enqueue]
    failures = []
    for values in params:
        for dataset in config.datasets:
            try:
                config.configs_for(values, dataset, config.stage1_epochs)
            except UsageError as exc:
                failures.append(f"{values} on {dataset}: {exc}")
    return failures


def check_study_file(path: Path) -> tuple[str, StudyConfig | None]:
    """The promise for one file: ("accepted", its config) or ("refused", None), else an AssertionError
    (or the exception)."""
    try:
        config = load_study(str(path))
    except UsageError as exc:
        message = str(exc)
        assert "\n" not in message, f"more than one line: {message!r}"
        assert str(path) in message, f"the file is not named: {message!r}"
        assert message.endswith("."), f"no full stop: {message!r}"
        return "refused", None
    failures = trials_that_cannot_be_built(config)
    assert not failures, f"accepted, but trials would fail: {failures[:3]}"
    # Workers and read-only commands read the study back from the storage's copy of its definition.
    again = StudyConfig.from_definition(config.definition(), trials=config.trials)
    assert again.definition() == config.definition()
    return "accepted", config


def start_in_process(path: Path, folder: Path) -> tuple[int, str]:
    """`nkat-search start --study PATH --workers 0` on a fresh journal in folder: (exit, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(
            ["start", "--study", str(path), "--storage", f"journal:{folder}/study.journal", "--workers", "0"]
        )
    return code, err.getvalue()


# ---------------------------------------------------------------------------------------------
# Study files


def test_the_toml_writer_writes_what_tomllib_reads():
    for raw in BASES.values():
        assert _same(tomllib.loads(to_toml(raw)), raw)


@SETTINGS
@given(study_files())
def test_a_mutated_study_file_is_accepted_whole_or_refused_in_one_sentence_with_nothing_written(case):
    base, raw, mutations = case
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "study.toml"
        path.write_text(to_toml(raw))
        if not _same(tomllib.loads(path.read_text()), raw):
            reject()  # a mutation TOML cannot express (an empty key table, say): not a file a user can write
        outcome, config = check_study_file(path)
        event(outcome)
        synthetic = outcome == "accepted" and config.data.source == "synthetic"
        if outcome == "refused" or synthetic:  # accepted real-data files would download datasets: not here
            code, stderr = start_in_process(path, folder)
            left = sorted(p.name for p in folder.iterdir())
            if outcome == "refused":
                lines = stderr.splitlines()
                assert code == 2, (mutations, stderr)
                assert len(lines) == 1 and lines[0].startswith("nkat-search: error: "), (mutations, stderr)
                assert left == ["study.toml"], (mutations, left)  # no journal, no lock file
            else:
                assert code == 0 and "study.journal" in left, (mutations, stderr)


def _study(tmp_path: Path, edits: list[tuple[str, str]]) -> Path:
    text = TINY_STUDY.format(name="tiny", trials=4, gate=0.01)
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "edits",
    [
        pytest.param(
            [("num_heads = 2", "num_heads = 4"), ("high = 16", "high = 20"), ("step = 8", "log = true")],
            id="log-int-range-interior",
        ),
        pytest.param(
            [("[space.temperature]", "[space.mlp_ratio]"), ("low = 0.6", "low = 0.05")],
            id="mlp-ratio-with-searched-width",
        ),
        pytest.param(
            [("num_heads = 2", "num_heads = 4"), ("high = 16", "high = 20"), ("step = 8", "step = 6")],
            id="stepped-range-interior",
        ),
        pytest.param([("step = 8", "step = 0.5")], id="int-step-fraction"),
    ],
)
def test_a_study_file_whose_trials_would_fail_is_refused(tmp_path, edits):
    assert check_study_file(_study(tmp_path, edits))[0] == "refused"


def test_an_unknown_key_with_a_line_break_is_named_on_one_line(tmp_path):
    path = _study(tmp_path, [("warmup = 0", 'warmup = 0\n"warm\\nup" = 1')])
    assert check_study_file(path)[0] == "refused"


# ---------------------------------------------------------------------------------------------
# train flags


class _Accepted(Exception):
    """Raised where cmd_train would load the data: the flags made valid configs."""


def _train_flags() -> list[tuple[str, int]]:
    """(flag, how many values) of every generated config flag of `train`."""
    parser = cli.build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    flags = []
    for action in train._actions:
        long = [o for o in action.option_strings if o.startswith("--")]
        if not long or action.dest in ("help", "json", "device", "dataset", "eval_test", "data_root", "data_source"):
            continue
        flags.append((long[-1], 0 if action.nargs == 0 else (action.nargs if isinstance(action.nargs, int) else 1)))
    return flags


TRAIN_FLAGS = _train_flags()
# What a user may type for a number: 2**31 is a large but usable seed; beyond 64 bits is refused
# (test_configs_refuse_values_that_training_cannot_use).
FLAG_TEXT = [
    "nan",
    "NaN",
    "inf",
    "-inf",
    "1e999",
    "-1e999",
    "0",
    "-1",
    "1",
    "2",
    "3",
    "8",
    "0.5",
    "1.5",
    "-0.5",
    "1e300",
    "1e-300",
    "2147483648",
    "99999999999999999999999",
    "abc",
    "",
    "true",
    "0x10",
    " 3",
    "1_000",
    "4.",
    "fp32",
    "tiny",
]
flag_sets = st.lists(
    st.tuples(st.sampled_from(TRAIN_FLAGS), st.lists(st.sampled_from(FLAG_TEXT), min_size=2, max_size=2)),
    min_size=1,
    max_size=3,
)


def _argv(flag_set) -> list[str]:
    argv = []
    for (flag, count), texts in flag_set:
        argv += [flag, *texts[:count]] if count else [flag]
    return argv


@SETTINGS
@given(flag_sets)
def test_train_flags_are_accepted_or_refused_with_exit_2_and_one_sentence(flag_set):
    argv = ["train", "--data-source", "synthetic", *_argv(flag_set)]
    err = io.StringIO()
    with (
        mock.patch("nkat_search.data.loader.load_splits", side_effect=_Accepted),
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
        except _Accepted:
            event("accepted")
            return  # ModelConfig, TrainConfig and DataConfig took the values
    event("refused by argparse" if isinstance(code, int) and err.getvalue().count("usage:") else "refused")
    stderr = err.getvalue()
    errors = [line for line in stderr.splitlines() if line.startswith("nkat-search")]
    assert code == 2, (argv, stderr)
    assert "Traceback" not in stderr, (argv, stderr)
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]) and "error: " in errors[0], (argv, stderr)


@pytest.mark.parametrize(
    "cls, values",
    [
        pytest.param(TrainConfig, {"seed": 10**23}, id="seed"),
        pytest.param(DataConfig, {"split_seed": 10**23}, id="split_seed"),
        pytest.param(DataConfig, {"source": "synthetic", "synthetic_test": 10**23}, id="synthetic_test"),
        pytest.param(TrainConfig, {"cutout": 10**23}, id="cutout"),
        pytest.param(TrainConfig, {"crop_padding": 10**23}, id="crop_padding"),
        pytest.param(TrainConfig, {"randaugment": (10**23, 9)}, id="randaugment-N"),
        pytest.param(ModelConfig, {"embed_dim": 8 * 10**22}, id="embed_dim"),
        pytest.param(ModelConfig, {"depth": 10**23}, id="depth"),
        pytest.param(ModelConfig, {"mlp_ratio": 1e300}, id="mlp_ratio"),
        pytest.param(ModelConfig, {"depth": 10**9}, id="depth-in-64-bits"),
        pytest.param(ModelConfig, {"embed_dim": 2**40}, id="embed_dim-in-64-bits"),
        pytest.param(TrainConfig, {"randaugment": (10**6, 9)}, id="randaugment-N-in-64-bits"),
        pytest.param(TrainConfig, {"cutout": 10**6}, id="cutout-in-64-bits"),
        pytest.param(DataConfig, {"source": "synthetic", "synthetic_train": 10**12}, id="synthetic_train-in-64-bits"),
    ],
)
def test_configs_refuse_values_that_training_cannot_use(cls, values):
    with pytest.raises(UsageError):
        cls(**values)
