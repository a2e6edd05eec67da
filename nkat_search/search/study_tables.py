"""The tables of a study file, each read and checked on its own or against the tables before it
(study_file.parse_study reads them in that order): [study], [sampler], [pruner], [stage1] and
[stage2], [data], [model], [train] with [stage2.train] and [train.<dataset>], [report],
[space.<parameter>] (a ParamSpec each) and [[enqueue]]. The type of every key is checked through
the config dataclasses; every problem is one UsageError naming the file, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..config import INT64, DataConfig, ModelConfig, TrainConfig, UsageError, field_names
from ..datasets import NAMES
from .kinds import HyperbandPrunerConfig, PrunerConfig

MODEL_KEYS = field_names(ModelConfig) - {"in_chans", "img_size", "num_classes"}  # the dataset decides those


TRAIN_KEYS = field_names(TrainConfig) - {"epochs"}  # each stage sets its epochs


# Set by the recipe or the machine, never a hyperparameter of a trial.
NOT_SEARCHABLE = {"epochs", "precision", "limit_train", "compile", "graphs"}


SEARCHABLE = (MODEL_KEYS | TRAIN_KEYS) - NOT_SEARCHABLE


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


PLAIN_KEY = re.compile(r"[\w.\[\]-]+")


SECTIONS = ("study", "sampler", "pruner", "stage1", "stage2", "data", "model", "train", "report", "space", "enqueue")


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: int/float range (optional step or log) or categorical choices,
    applied to the datasets listed (all of the study's when empty)."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple = ()
    datasets: tuple[str, ...] = ()

    def values(self) -> list:
        """Values to check: every choice, every int of a short range (log scale or not: Optuna draws
        any int of a log range), the ends of a float range. Of a long int range: both ends, their
        neighbours (a step that breaks divisibility shows there) and, on a log scale, the powers of two."""
        if self.type == "categorical":
            return list(self.choices)
        assert self.low is not None and self.high is not None  # _param_spec sets both for int and float
        if self.type == "int":
            low, high, step = int(self.low), int(self.high), 1 if self.log else int(self.step or 1)
            count = (high - low) // step + 1
            if count <= 256:
                return list(range(low, high + 1, step))
            last = high - (high - low) % step
            powers = {2**k for k in range(64) if low <= 2**k <= high} if self.log else set()
            return sorted({low, low + step, last - step, last} | powers)
        return [float(self.low), float(self.high)]  # what Optuna gives: floats, even for `low = 2`

    def contains(self, value) -> bool:
        if self.type == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type == "int" and not isinstance(value, int):
            return False
        assert self.low is not None and self.high is not None  # _param_spec sets both for int and float
        return self.low <= value <= self.high

    def to_dict(self) -> dict:
        out: dict[str, object] = {"type": self.type}
        if self.type == "categorical":
            out["choices"] = list(self.choices)
        else:
            out.update(low=self.low, high=self.high, log=self.log)
            if self.step is not None:
                out["step"] = self.step
        if self.datasets:
            out["datasets"] = list(self.datasets)
        return out


# fail(key, problem) gives the UsageError that names the file and the key; failure(path) makes one.
Fail = Callable[[str, str], UsageError]


def failure(path: str) -> Fail:
    """fail(key, problem): the UsageError `<path>: <key>: <problem>` that every check raises."""

    def fail(key: str, problem: str) -> UsageError:
        return UsageError(f"{path}: {_named(key)}: {problem}")

    return fail


def _named(key: str) -> str:
    """A dotted key as a message shows it: as written when plain, else quoted (repr), so that a
    quoted TOML key holding a line break cannot split the one-line message."""
    return key if PLAIN_KEY.fullmatch(key) else repr(key)


def check_sections(raw: dict, fail: Fail) -> None:
    """Only the known sections, each a table ([[enqueue]]: a list of tables)."""
    for section, value in raw.items():
        if section not in SECTIONS:
            raise fail(section, f"unknown section; use one of {', '.join(SECTIONS)}.")
        if section == "enqueue":
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise fail(section, "must be a list of tables ([[enqueue]]).")
        elif not isinstance(value, dict):
            raise fail(section, f"must be a table ([{section}]).")


def _table(
    raw: dict, section: str, allowed: set[str], fail: Fail, required: frozenset[str] | set[str] = frozenset()
) -> dict:
    """A table's keys and values, every key among `allowed` and every `required` one present."""
    values = dict(raw.get(section, {}))
    for key in values:
        if key not in allowed:
            raise fail(f"{section}.{key}", f"unknown key; use one of {', '.join(sorted(allowed))}.")
    for key in sorted(required - set(values)):
        raise fail(f"{section}.{key}", "is required; add it to the file.")
    return values


def _build(key: str, cls, values: dict, fail: Fail):
    """cls(**values), its UsageError (a value out of range) named after `key`."""
    try:
        return cls(**values)
    except UsageError as exc:
        raise fail(key, str(exc)) from None


def study_table(raw: dict, fail: Fail) -> tuple[str, int]:
    """[study]: the name (it names the study in the storage) and the trial budget."""
    study = _table(raw, "study", {"name", "trials"}, fail, {"name"})
    name, trials = study["name"], study.get("trials", 50)
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise fail(
            "study.name", f"must be a name of letters, digits, '.', '_' and '-' (no spaces or slashes), got {name!r}."
        )
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise fail("study.trials", f"must be a positive whole number, got {trials!r}.")
    if trials > INT64[1]:
        raise fail("study.trials", f"{trials} does not fit in 64 bits; use a whole number from 1 to {INT64[1]}.")
    return name, trials


def kind_table(raw: dict, section: str, kinds: dict, default_kind: str, fail: Fail):
    """[sampler] or [pruner]: its kind and the settings of that kind."""
    values = dict(raw.get(section, {}))
    kind = values.pop("kind", default_kind)
    if not isinstance(kind, str) or kind not in kinds:
        raise fail(f"{section}.kind", f"unknown {section} {kind!r}; use one of {', '.join(kinds)}.")
    allowed = field_names(kinds[kind])
    for key in values:
        if key not in allowed:
            keys = ", ".join(sorted(allowed)) or "no other keys"
            raise fail(f"{section}.{key}", f"is not a setting of the {kind} {section}; it takes {keys}.")
    return _build(section, kinds[kind], values, fail)


def stage_tables(raw: dict, pruner: PrunerConfig, fail: Fail) -> tuple[dict, dict]:
    """[stage1] and [stage2]: known datasets, each once; the gate; the epochs of each stage, which
    Hyperband's min_resource must not exceed."""
    stage1 = _table(raw, "stage1", {"dataset", "epochs", "gate"}, fail, {"dataset", "epochs", "gate"})
    stage2 = _table(raw, "stage2", {"datasets", "epochs", "train"}, fail, {"datasets", "epochs"})
    dataset1, datasets2 = stage1["dataset"], stage2["datasets"]
    if dataset1 not in NAMES:
        raise fail("stage1.dataset", f"unknown dataset {dataset1!r}; use one of {', '.join(NAMES)}.")
    if not isinstance(datasets2, list):
        raise fail("stage2.datasets", f"must be a list of dataset names, got {datasets2!r}.")
    for ds in datasets2:
        if ds not in NAMES:
            raise fail("stage2.datasets", f"unknown dataset {ds!r}; use one of {', '.join(NAMES)}.")
    if len(set(datasets2) | {dataset1}) != len(datasets2) + 1:
        raise fail("stage2.datasets", "names a dataset twice (or the Stage-1 dataset); list each dataset once.")
    gate = stage1["gate"]
    if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0 < gate < float("inf"):
        raise fail("stage1.gate", f"must be a number in (0, inf), got {gate!r}; the research's gate is 0.60.")
    for key, value in (("stage1.epochs", stage1["epochs"]), ("stage2.epochs", stage2["epochs"])):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise fail(key, f"must be a positive whole number, got {value!r}.")
    if isinstance(pruner, HyperbandPrunerConfig) and pruner.min_resource > stage1["epochs"]:
        raise fail(
            "pruner.min_resource", f"{pruner.min_resource} is more than stage1.epochs ({stage1['epochs']}); lower it."
        )
    return stage1, stage2


def data_table(raw: dict, fail: Fail) -> DataConfig:
    """[data]: where the datasets come from and how they are split."""
    return _build("data", DataConfig, _table(raw, "data", field_names(DataConfig), fail), fail)


def model_table(raw: dict, fail: Fail) -> dict:
    """[model]: the fixed model settings, which alone must make a model."""
    model = _table(raw, "model", MODEL_KEYS, fail)
    _build("model", ModelConfig, model, fail)
    return model


def train_tables(raw: dict, stage2: dict, datasets: tuple[str, ...], fail: Fail) -> tuple[TrainConfig, dict, dict]:
    """[train], [stage2.train] and [train.<dataset>]: the recipe, the keys [train] fixes, and the
    overrides by "stage2" or dataset name, each of which must make a recipe."""
    train_table = dict(raw.get("train", {}))
    overrides = {ds: train_table.pop(ds) for ds in list(train_table) if ds in NAMES}
    for key in train_table:
        if key not in TRAIN_KEYS:
            raise fail(
                f"train.{key}",
                f"unknown key; use one of {', '.join(sorted(TRAIN_KEYS))} "
                "or a dataset name for that dataset's own recipe ([train.mnist]).",
            )
    train = _build("train", TrainConfig, train_table, fail)
    if stage2.get("train"):
        overrides["stage2"] = stage2["train"]
    for where, values in overrides.items():
        key = "stage2.train" if where == "stage2" else f"train.{where}"
        if not isinstance(values, dict):
            raise fail(key, "must be a table of training settings.")
        if where != "stage2" and where not in datasets:
            raise fail(key, f"{where} is not a dataset of this study; use one of {', '.join(datasets)}.")
        for k in values:
            if k not in TRAIN_KEYS:
                raise fail(f"{key}.{k}", f"unknown key; use one of {', '.join(sorted(TRAIN_KEYS))}.")
        _build(key, lambda **kw: dataclasses.replace(train, **kw), values, fail)
    return train, train_table, overrides


def report_table(raw: dict, train: TrainConfig, fail: Fail) -> tuple[int, int]:
    """[report]: epochs and warm-up of `nkat-search report`'s retraining (warm-up: the recipe's)."""
    report = _table(raw, "report", {"epochs", "warmup"}, fail)
    epochs, warmup = report.get("epochs", 40), report.get("warmup", train.warmup)
    _build("report", TrainConfig, {"epochs": epochs, "warmup": warmup}, fail)
    return epochs, warmup


def space_tables(
    raw: dict, datasets: tuple[str, ...], fixed: set[str], overrides: dict, fail: Fail
) -> tuple[ParamSpec, ...]:
    """[space.<parameter>]: at least one; none also fixed ([model], [train], `fixed`) or overridden
    ([stage2.train], [train.<dataset>]) on a dataset it is searched on. datasets: Stage 1's first."""
    space_raw = raw.get("space", {})
    if not space_raw:
        raise fail("space", "is empty; declare at least one [space.<parameter>].")
    space = tuple(_param_spec(n, spec, datasets, fail) for n, spec in space_raw.items())
    for p in space:
        if not p.datasets and p.name in fixed:
            raise fail(
                f"space.{p.name}",
                "is both searched and fixed in [model]/[train]; keep one (or restrict "
                "the search with datasets = [...]).",
            )
        for where, values in overrides.items():
            targets = datasets[1:] if where == "stage2" else (where,)
            if p.name in values and any(p.datasets == () or ds in p.datasets for ds in targets):
                key = "stage2.train" if where == "stage2" else f"train.{where}"
                raise fail(
                    f"space.{p.name}",
                    f"is searched on a dataset where {key} fixes it; restrict the "
                    f"parameter with datasets = [...] or drop it from {key}.",
                )
    return space


def _param_spec(name: str, spec, datasets: tuple[str, ...], fail: Fail) -> ParamSpec:
    key = f"space.{name}"
    if name in NOT_SEARCHABLE or name in ("in_chans", "img_size", "num_classes"):
        raise fail(key, "is set by the stage, the dataset or the machine, not searched; remove it from [space].")
    if name not in SEARCHABLE:
        raise fail(key, f"is not a parameter of the model or the recipe; use one of {', '.join(sorted(SEARCHABLE))}.")
    kinds = {"int": {"low", "high", "step", "log"}, "float": {"low", "high", "step", "log"}, "categorical": {"choices"}}
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str) or spec["type"] not in kinds:
        raise fail(key, 'needs type = "int", "float" or "categorical".')
    kind = spec["type"]
    for k in spec:
        if k not in kinds[kind] | {"type", "datasets"}:
            raise fail(
                key, f"unknown key {k!r}; a {kind} parameter takes {', '.join(sorted(kinds[kind] | {'datasets'}))}."
            )
    on = spec.get("datasets", [])
    if not isinstance(on, list) or not on and "datasets" in spec or any(d not in datasets for d in on):
        raise fail(
            key, f"datasets must be a non-empty list of this study's datasets ({', '.join(datasets)}), got {on!r}."
        )
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise fail(key, "needs a non-empty list of choices.")
        if any(not isinstance(c, (str, int, float, bool)) for c in choices) or len(set(map(repr, choices))) != len(
            choices
        ):
            raise fail(key, "choices must be distinct strings, numbers or booleans.")
        return ParamSpec(name, kind, choices=tuple(choices), datasets=tuple(on))
    low, high, step, log = spec.get("low"), spec.get("high"), spec.get("step"), spec.get("log", False)
    number = (int,) if kind == "int" else (int, float)
    for bound, value in (("low", low), ("high", high)) + ((("step", step),) if step is not None else ()):
        if isinstance(value, bool) or not isinstance(value, number) or value != value or abs(value) == float("inf"):
            what = "a whole number" if kind == "int" else "a finite number"
            raise fail(key, f"{bound} must be {what}, got {value!r}.")
        if isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
            raise fail(key, f"{bound} does not fit in 64 bits; use a value from {INT64[0]} to {INT64[1]}.")
    if not isinstance(log, bool):
        raise fail(key, f"log must be true or false, got {log!r}.")
    assert low is not None and high is not None  # the loop above raised unless both are numbers
    if low >= high:
        raise fail(key, f"the range {low}..{high} is empty or inverted; make low < high.")
    if log and low <= 0:
        raise fail(key, "a log-scale range must have low > 0.")
    if step is not None and (log or not step > 0):
        raise fail(key, "step must be > 0 and cannot be combined with log.")
    return ParamSpec(name, kind, low=low, high=high, step=step, log=log, datasets=tuple(on))


def enqueue_tables(raw: dict, space: tuple[ParamSpec, ...], fail: Fail) -> tuple[dict, ...]:
    """[[enqueue]]: configurations evaluated first, of searched parameters inside their ranges."""
    specs = {p.name: p for p in space}
    for index, values in enumerate(raw.get("enqueue", [])):
        for key, value in values.items():
            if key not in specs:
                raise fail(f"enqueue[{index}].{key}", f"is not a searched parameter; use one of {', '.join(specs)}.")
            if not specs[key].contains(value):
                raise fail(
                    f"enqueue[{index}].{key}",
                    f"{value!r} is outside the searched space "
                    f"({specs[key].to_dict()}); change the value or widen the space.",
                )
    return tuple(dict(values) for values in raw.get("enqueue", []))
