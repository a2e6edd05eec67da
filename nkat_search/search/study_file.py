"""Study files (nkat_search/studies/*.toml or the user's own): reading, checking, and a trial's
parameters turned into the ModelConfig and TrainConfig it trains with on each dataset.

Everything a study file can hold is checked here, before anything touches a storage: each table
on its own (study_tables.py: the type of every key through the config dataclasses, the ranges),
then every value that a searched range can produce against the model's constraints on every
dataset of the study. Each problem is one UsageError naming the file, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

from ..config import DataConfig, ModelConfig, TrainConfig, UsageError, adapt_patch_size
from ..datasets import DATASETS
from .kinds import PRUNERS, SAMPLERS, PrunerConfig, SamplerConfig, TPESamplerConfig, kind_dict
from .study_tables import (
    MODEL_KEYS,
    TRAIN_KEYS,
    Fail,
    ParamSpec,
    check_sections,
    data_table,
    enqueue_tables,
    failure,
    kind_table,
    model_table,
    report_table,
    space_tables,
    stage_tables,
    study_table,
    train_tables,
)

# Parameters whose valid values depend on each other (divisibility, feature-map size): their
# searched values are checked in every combination.
COUPLED = ("conv_stem", "patch_size", "embed_dim", "num_heads", "split_heads", "mlp_ratio")

# Fields added after studies were first stored, by section: definition() writes them only when a
# study sets them to something other than their default, so an older study's definition still matches.
ADDED_LATER = {
    section: {f.name: f.default for f in dataclasses.fields(cls) if f.name in names}
    for section, cls, names in (("train", TrainConfig, {"graphs"}), ("sampler", TPESamplerConfig, {"n_ei_candidates"}))
}


def _without_later_defaults(section: str, table: dict) -> dict:
    """table less the fields of ADDED_LATER[section] that hold their default."""
    later = ADDED_LATER[section]
    return {k: v for k, v in table.items() if not (k in later and later[k] == v)}


MAX_COMBINATIONS = 20000


@dataclass(frozen=True)
class StudyConfig:
    name: str
    path: str
    trials: int
    space: tuple[ParamSpec, ...]
    sampler: SamplerConfig
    pruner: PrunerConfig
    stage1_dataset: str
    stage1_epochs: int
    gate: float
    stage2_datasets: tuple[str, ...]
    stage2_epochs: int
    data: DataConfig
    model: dict  # fixed ModelConfig fields
    train: TrainConfig  # the recipe; epochs is set per stage
    train_overrides: dict  # "stage2" and dataset names -> TrainConfig fields for those datasets
    report_epochs: int
    report_warmup: int
    enqueue: tuple[dict, ...] = ()  # configurations evaluated first

    @property
    def datasets(self) -> tuple[str, ...]:
        return (self.stage1_dataset, *self.stage2_datasets)

    def recipe(self, dataset: str) -> TrainConfig:
        """The training recipe on one dataset: [train], then [stage2.train], then [train.<dataset>]."""
        changes = dict(self.train_overrides.get("stage2", {})) if dataset in self.stage2_datasets else {}
        changes.update(self.train_overrides.get(dataset, {}))
        return dataclasses.replace(self.train, **changes) if changes else self.train

    def applies(self, param: ParamSpec, dataset: str) -> bool:
        return not param.datasets or dataset in param.datasets

    def configs_for(self, params: dict, dataset: str, epochs: int) -> tuple[ModelConfig, TrainConfig]:
        """The model and recipe of a trial on one dataset: fixed settings, then the searched ones.

        The dataset decides channels, image size and classes. The patch size is searched for the
        Stage-1 dataset and must divide its feature map; on datasets of another image size it is
        adapted by config.adapt_patch_size (recorded on the trial as <dataset>_patch_size)."""
        shape = DATASETS[dataset]
        applied = {p.name: params[p.name] for p in self.space if p.name in params and self.applies(p, dataset)}
        extra = {k: v for k, v in params.items() if k not in {p.name for p in self.space}}  # enqueued extras
        applied.update(extra)
        model_kwargs = {**self.model, **{k: v for k, v in applied.items() if k in MODEL_KEYS}}
        model_kwargs.update(in_chans=shape.channels, img_size=shape.image_size, num_classes=shape.num_classes)
        if shape.image_size != DATASETS[self.stage1_dataset].image_size:
            patch = model_kwargs.get("patch_size", ModelConfig.patch_size)
            stem = model_kwargs.get("conv_stem", ModelConfig.conv_stem)
            if isinstance(patch, int) and patch >= 1 and stem in ("off", "tiny", "small"):
                model_kwargs["patch_size"] = adapt_patch_size(shape.image_size, stem, patch)
        model_cfg = ModelConfig(**model_kwargs)
        train_cfg = dataclasses.replace(
            self.recipe(dataset), epochs=epochs, **{k: v for k, v in applied.items() if k in TRAIN_KEYS}
        )
        return model_cfg, train_cfg

    def definition(self) -> dict:
        """What makes two studies the same search, in the study file's own shape (stored on the
        study; the path and the budget are not part of it). from_definition reads it back."""
        searched = {p.name for p in self.space if not p.datasets}
        train = {k: v for k, v in dataclasses.asdict(self.train).items() if k != "epochs" and k not in searched}
        train = _without_later_defaults("train", train)
        train.update({ds: dict(v) for ds, v in self.train_overrides.items() if ds != "stage2"})
        return _jsonable(
            {
                "study": {"name": self.name},
                "sampler": _without_later_defaults("sampler", kind_dict(self.sampler)),
                "pruner": kind_dict(self.pruner),
                "stage1": {"dataset": self.stage1_dataset, "epochs": self.stage1_epochs, "gate": self.gate},
                "stage2": {
                    "datasets": list(self.stage2_datasets),
                    "epochs": self.stage2_epochs,
                    "train": dict(self.train_overrides.get("stage2", {})),
                },
                "data": dataclasses.asdict(self.data),
                "model": dict(self.model),
                "train": train,
                "report": {"epochs": self.report_epochs, "warmup": self.report_warmup},
                "space": {p.name: p.to_dict() for p in self.space},
                "enqueue": [dict(e) for e in self.enqueue],
            }
        )

    @classmethod
    def from_definition(cls, definition: dict, trials: int = 1) -> "StudyConfig":
        """The StudyConfig stored on a study by definition()."""
        raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in definition.items()}
        raw["study"] = {**raw.get("study", {}), "trials": max(1, trials)}
        return parse_study(raw, "<stored definition>")


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def packaged_studies() -> dict[str, Path]:
    """The study files shipped inside the package, by name (round2, smoke)."""
    folder = Path(__file__).parent.parent / "studies"
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}


def study_path(name_or_path: str) -> Path:
    """A packaged study's file by name, or the file at a path; anything else is a UsageError."""
    packaged = packaged_studies()
    if name_or_path in packaged:
        return packaged[name_or_path]
    path = Path(name_or_path)
    if name_or_path and path.is_file():
        return path
    raise UsageError(
        f"study {name_or_path or '(empty)'} is neither a packaged study ({', '.join(packaged)}) nor an "
        "existing file; pass one of those names or the path of your own study file "
        "(`nkat-search studies` lists them)."
    )


def load_study(name_or_path: str) -> StudyConfig:
    """Read and check a study file (a packaged name or a path)."""
    import tomllib

    path = str(study_path(name_or_path))
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        # Some Windows editors save UTF-8 with a byte-order mark, which TOML's grammar does not allow.
        raw = tomllib.loads(data.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read the study file {path} ({exc.strerror}); check its permissions.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"{path} is not valid TOML ({reason}); fix the syntax at that line.") from None
    return parse_study(raw, path)


def parse_study(raw: dict, path: str) -> StudyConfig:
    """A StudyConfig from a study file's tables; every problem is one UsageError naming the key.

    The tables are read in this order because later ones are checked against earlier ones: the
    pruner against [stage1], [train.<dataset>] against the stages' datasets, [space] against
    [model] and [train], [[enqueue]] against [space], and at the end the whole space against the
    model's constraints on every dataset."""
    fail = failure(path)
    check_sections(raw, fail)
    name, trials = study_table(raw, fail)
    sampler = kind_table(raw, "sampler", SAMPLERS, "tpe", fail)
    pruner = kind_table(raw, "pruner", PRUNERS, "median", fail)
    stage1, stage2 = stage_tables(raw, pruner, fail)
    datasets = (stage1["dataset"], *stage2["datasets"])
    data = data_table(raw, fail)
    model = model_table(raw, fail)
    train, fixed_train, overrides = train_tables(raw, stage2, datasets, fail)
    report_epochs, report_warmup = report_table(raw, train, fail)
    space = space_tables(raw, datasets, model.keys() | fixed_train.keys(), overrides, fail)
    enqueue = enqueue_tables(raw, space, fail)
    config = StudyConfig(
        name=name,
        path=path,
        trials=trials,
        space=space,
        sampler=sampler,
        pruner=pruner,
        stage1_dataset=stage1["dataset"],
        stage1_epochs=stage1["epochs"],
        gate=float(stage1["gate"]),
        stage2_datasets=tuple(stage2["datasets"]),
        stage2_epochs=stage2["epochs"],
        data=data,
        model=model,
        train=train,
        train_overrides=overrides,
        report_epochs=report_epochs,
        report_warmup=report_warmup,
        enqueue=enqueue,
    )
    _check_space(config, fail)
    return config


def _check_space(study: StudyConfig, fail: Fail) -> None:
    """Every value a searched range can produce (coupled parameters in every combination) makes a
    valid model and recipe on every dataset it applies to, and so do the enqueued configurations."""

    def check(params: dict) -> None:
        for ds in study.datasets:
            study.configs_for(params, ds, 1)

    for p in study.space:  # each value alone, the other fields at their fixed or default values
        for value in p.values() if p.name not in COUPLED else ():
            try:
                check({p.name: value})
            except UsageError as exc:
                raise fail(f"space.{p.name}", f"the value {value!r} is invalid: {exc}") from None
    coupled = [p for p in study.space if p.name in COUPLED]
    grids = [[(p.name, v) for v in p.values()] for p in coupled]
    combos = (
        itertools.product(*grids)
        if math.prod(len(g) for g in grids) <= MAX_COMBINATIONS
        else ((pair,) for g in grids for pair in g)
    )  # too many to try: each value alone
    key = f"space.{coupled[0].name}" if len(coupled) == 1 else "space"
    for combo in combos:
        try:
            check(dict(combo))
        except UsageError as exc:
            raise fail(key, f"the searched values {dict(combo)} are invalid together: {exc}") from None
    base = {p.name: p.values()[0] for p in study.space}
    for i, values in enumerate(study.enqueue):
        for ds in study.datasets:
            try:
                study.configs_for(dict(base, **values), ds, 1)
            except UsageError as exc:
                raise fail(f"enqueue[{i}]", f"cannot train on {ds}: {exc}") from None


def check_warm_start(study: StudyConfig, trials) -> None:
    """Finished trials of another study fit this study's space (every searched parameter present
    with a value inside its range), or a UsageError says which do not."""
    specs = {p.name: p for p in study.space}
    for t in trials:
        missing = sorted(set(specs) - set(t.params))
        outside = sorted(k for k, v in t.params.items() if k in specs and not specs[k].contains(v))
        extra = sorted(set(t.params) - set(specs))
        if missing or outside or extra:
            problem = (
                f"lacks {', '.join(missing)}"
                if missing
                else f"has {', '.join(outside)} outside this study's ranges"
                if outside
                else f"searched {', '.join(extra)}, which this study does not"
            )
            raise UsageError(
                f"trial {t.number} of the warm-start study {problem}; warm-start only from a study "
                "whose space fits this one."
            )
