"""Frozen configuration objects: the one way a model, a training run and a dataset are described.

CLI flags and study files become these dataclasses once, at the edge; everything inside takes
them as arguments. Each dataclass validates itself in __post_init__ and raises UsageError with a
sentence that names the field and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path


class UsageError(ValueError):
    """A user's mistake: the message is one sentence naming the problem and the fix (exit 2)."""


CONV_STEMS = ("off", "tiny", "small")
# Total downsampling of each stem: tiny and small both halve the image twice.
STEM_STRIDE = {"off": 1, "tiny": 4, "small": 4}
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class ModelConfig:
    """The NKAT ViT (seed-notes, "The model changes planned for CIFAR-10")."""

    in_chans: int = 3
    img_size: int = 32
    num_classes: int = 10
    conv_stem: str = "tiny"
    patch_size: int = 2
    embed_dim: int = 384
    depth: int = 7
    num_heads: int = 8
    mlp_ratio: float = 4.0
    temperature: float = 0.65
    top_k: int = 6  # 0 turns the top-k filter off
    top_p: float = 0.80  # 1.0 turns the top-p filter off
    nkat_strength: float = 0.0024  # 0 turns the modulation (and its parameters) off
    nkat_decay: float = 0.99
    dropout_attn: float = 0.17
    dropout_embed: float = 0.08
    dropout_head: float = 0.1
    color_norm: bool = True
    split_heads: bool = False
    channel_shuffle: bool = False

    def __post_init__(self) -> None:
        if self.conv_stem not in CONV_STEMS:
            raise UsageError(f"conv_stem {self.conv_stem!r} is unknown; use one of {', '.join(CONV_STEMS)}.")
        if self.in_chans < 1 or self.num_classes < 2 or self.img_size < 1:
            raise UsageError("in_chans must be >= 1, num_classes >= 2 and img_size >= 1.")
        feature = self.img_size // STEM_STRIDE[self.conv_stem]
        if self.img_size % STEM_STRIDE[self.conv_stem] or self.patch_size < 1 or feature % self.patch_size:
            raise UsageError(
                f"patch_size {self.patch_size} does not divide the {feature}x{feature} feature map that the "
                f"{self.conv_stem!r} stem makes from {self.img_size}x{self.img_size} images; "
                f"pick a divisor of {feature}."
            )
        if self.embed_dim < 1 or self.num_heads < 1 or self.embed_dim % self.num_heads:
            raise UsageError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}; "
                f"use a multiple of {self.num_heads}."
            )
        if self.depth < 1:
            raise UsageError(f"depth must be at least 1, got {self.depth}.")
        if not self.temperature > 0:
            raise UsageError(f"temperature must be > 0, got {self.temperature}; 0.6-1.0 is the searched range.")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}; use 1.0 to turn the filter off.")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0, got {self.top_k}; use 0 to turn the filter off.")
        if self.nkat_strength < 0 or not 0 < self.nkat_decay <= 1:
            raise UsageError("nkat_strength must be >= 0 and nkat_decay in (0, 1].")
        for name in ("dropout_attn", "dropout_embed", "dropout_head"):
            if not 0 <= getattr(self, name) < 1:
                raise UsageError(f"{name} must be in [0, 1), got {getattr(self, name)}.")
        if self.split_heads and self.num_heads < self.in_chans + 1:
            raise UsageError(
                f"split_heads needs more heads ({self.num_heads}) than input channels ({self.in_chans}); "
                "raise num_heads or turn split_heads off."
            )

    @property
    def num_patches(self) -> int:
        return (self.img_size // STEM_STRIDE[self.conv_stem] // self.patch_size) ** 2

    @property
    def filtered(self) -> bool:
        """True when attention needs the explicit path (top-k, top-p or NKAT modulation on)."""
        return self.top_k > 0 or self.top_p < 1 or self.nkat_strength > 0 or self.split_heads


@dataclass(frozen=True)
class TrainConfig:
    """One training run (seed-notes, "The training recipe planned")."""

    epochs: int = 40
    warmup: int = 5
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 1e-4
    ema: float = 0.9995  # 0 turns EMA off
    clip_grad: float = 1.0  # 0 turns clipping off
    label_smoothing: float = 0.1
    mixup: float = 0.1  # Beta(alpha, alpha) of MixUp; 0 turns it off
    cutmix: float = 0.2  # probability that a batch uses CutMix instead of MixUp; 0 turns it off
    randaugment: tuple[int, int] = (2, 9)  # (N, M); N = 0 turns it off
    cutout: int = 8  # side of the erased square in pixels; 0 turns it off
    crop_padding: int = 4  # random crop after zero padding; 0 turns it off
    seed: int = 0
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on the CPU
    limit_train: int = 0  # if > 0, at most this many batches per epoch (explicit, recorded)
    compile: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise UsageError(f"epochs must be at least 1, got {self.epochs}.")
        if self.warmup < 0:
            raise UsageError(f"warmup must be >= 0 epochs, got {self.warmup}.")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be at least 1, got {self.batch_size}.")
        if not self.lr > 0:
            raise UsageError(f"lr must be > 0, got {self.lr}.")
        if not 0 <= self.ema < 1:
            raise UsageError(f"ema must be in [0, 1), got {self.ema}; use 0 to turn EMA off.")
        if self.clip_grad < 0 or self.weight_decay < 0 or self.mixup < 0 or self.cutout < 0:
            raise UsageError("clip_grad, weight_decay, mixup and cutout must be >= 0.")
        if not 0 <= self.cutmix <= 1:
            raise UsageError(f"cutmix is a probability in [0, 1], got {self.cutmix}.")
        if not 0 <= self.label_smoothing < 1:
            raise UsageError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        n, m = self.randaugment
        if n < 0 or not 0 <= m <= 30:
            raise UsageError(f"randaugment N M needs N >= 0 and 0 <= M <= 30, got {n} {m}.")
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision {self.precision!r} is unknown; use one of {', '.join(PRECISIONS)}.")
        if self.limit_train < 0:
            raise UsageError(f"limit_train must be >= 0, got {self.limit_train}.")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how the validation split is held out."""

    source: str = "torchvision"  # torchvision (real files) or synthetic (generated)
    root: str = "data"
    val_size: int = 5000
    split_seed: int = 0
    download: bool = True
    synthetic_train: int = 10000  # images generated for train + validation (synthetic source)
    synthetic_test: int = 2000

    def __post_init__(self) -> None:
        if self.source not in ("torchvision", "synthetic"):
            raise UsageError(f"data source {self.source!r} is unknown; use torchvision or synthetic.")
        if self.val_size < 1:
            raise UsageError(f"val_size must be at least 1, got {self.val_size}.")
        if self.source == "synthetic" and self.val_size >= self.synthetic_train:
            raise UsageError(
                f"val_size {self.val_size} leaves no training images out of synthetic_train "
                f"{self.synthetic_train}; lower val_size or raise synthetic_train."
            )
        if self.synthetic_train < 2 or self.synthetic_test < 1:
            raise UsageError("synthetic_train must be >= 2 and synthetic_test >= 1.")


def replace(cfg, **changes):
    """A copy of a frozen config with some fields changed (validated again)."""
    return dataclasses.replace(cfg, **changes)


def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def adapt_patch_size(img_size: int, conv_stem: str, patch_size: int) -> int:
    """The patch size a trial uses on a dataset of this image size.

    A searched patch size is meant for 32x32 CIFAR-10; on 28x28 images the stem's feature map is
    28 or 7 pixels wide, which 2 or 4 may not divide. The rule: the largest divisor of the
    feature map that is at most the requested patch size, so tokens are never coarser than asked.
    """
    feature = img_size // STEM_STRIDE[conv_stem]
    return max(d for d in range(1, patch_size + 1) if feature % d == 0)


# ---------------------------------------------------------------------------------------------
# Study files (studies/*.toml)

DATASET_NAMES = ("cifar10", "mnist", "fashion_mnist", "emnist_letters")
# Fields a study may search or fix: everything but what the dataset decides.
DATASET_FIELDS = {"in_chans", "img_size", "num_classes"}
SEARCHABLE = (field_names(ModelConfig) - DATASET_FIELDS) | (field_names(TrainConfig) - {"limit_train", "compile"})
PRUNERS = ("none", "median", "percentile", "hyperband", "successive_halving")
STUDY_KEYS = {
    "study": {"name", "trials"},
    "sampler": {"kind", "seed", "multivariate", "constant_liar", "n_startup_trials"},
    "pruner": {"kind", "n_startup_trials", "n_warmup_steps", "percentile", "min_resource", "reduction_factor"},
    "stage1": {"dataset", "epochs", "gate"},
    "stage2": {"datasets", "epochs"},
    "data": {"source", "root", "val_size", "split_seed", "download", "synthetic_train", "synthetic_test"},
    "model": field_names(ModelConfig) - DATASET_FIELDS,
    "train": field_names(TrainConfig) - {"epochs"},
    "report": {"epochs", "warmup"},
    "space": None,  # checked per parameter below
}
PARAM_KEYS = {"int": {"type", "low", "high", "step", "log"}, "float": {"type", "low", "high", "step", "log"},
              "categorical": {"type", "choices"}}


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: int/float range (optional step or log) or categorical choices."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple = ()


@dataclass(frozen=True)
class StudyConfig:
    name: str
    path: str
    trials: int
    space: tuple[ParamSpec, ...]
    sampler: dict
    pruner: dict
    stage1_dataset: str
    stage1_epochs: int
    gate: float
    stage2_datasets: tuple[str, ...]
    stage2_epochs: int
    data: DataConfig
    model: dict  # fixed ModelConfig fields
    train: TrainConfig  # the recipe; epochs is set per stage
    report_epochs: int
    report_warmup: int

    def definition(self) -> dict:
        """What makes two studies the same search (stored on the study; the path and budget are not part)."""
        out = dataclasses.asdict(self)
        for key in ("path", "trials"):
            out.pop(key)
        return _jsonable(out)

    @classmethod
    def from_definition(cls, d: dict, path: str = "<storage>", trials: int = 0) -> "StudyConfig":
        """The StudyConfig stored on a study by definition()."""
        train = dict(d["train"], randaugment=tuple(d["train"]["randaugment"]))
        return cls(**{
            **d, "path": path, "trials": trials,
            "space": tuple(ParamSpec(**dict(p, choices=tuple(p["choices"]))) for p in d["space"]),
            "stage2_datasets": tuple(d["stage2_datasets"]), "data": DataConfig(**d["data"]),
            "train": TrainConfig(**train),
        })


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def packaged_studies() -> dict[str, Path]:
    """The study files shipped inside the package, by name (round2, smoke)."""
    folder = Path(__file__).with_name("studies")
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}


def study_path(name_or_path: str) -> Path:
    """A packaged study's file by name, or the file at a path; anything else is a UsageError."""
    packaged = packaged_studies()
    if name_or_path in packaged:
        return packaged[name_or_path]
    path = Path(name_or_path)
    if path.is_file():
        return path
    raise UsageError(f"study {name_or_path} is neither a packaged study ({', '.join(packaged)}) nor an existing file; "
                     "pass one of those names or the path of your own study file (`nkat-search studies` lists them).")


def load_study(name_or_path: str) -> StudyConfig:
    """Read and validate a study file; every problem is one UsageError naming the file and the key."""
    import tomllib

    path = str(study_path(name_or_path))
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise UsageError(f"cannot read the study file {path} ({exc.strerror}); check its permissions.") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML ({exc}); fix the syntax at that line.") from None

    def fail(key: str, problem: str) -> UsageError:
        return UsageError(f"{path}: {key}: {problem}")

    for section, value in raw.items():
        if section not in STUDY_KEYS:
            raise fail(section, f"unknown section; use one of {', '.join(STUDY_KEYS)}.")
        if not isinstance(value, dict):
            raise fail(section, "must be a table ([" + section + "]).")
        allowed = STUDY_KEYS[section]
        for key in value if allowed is not None else ():
            if key not in allowed:
                raise fail(f"{section}.{key}", f"unknown key; use one of {', '.join(sorted(allowed))}.")

    def get(section: str, key: str, default=dataclasses.MISSING):
        value = raw.get(section, {}).get(key, default)
        if value is dataclasses.MISSING:
            raise fail(f"{section}.{key}", "is required; add it to the file.")
        return value

    name = get("study", "name")
    if not isinstance(name, str) or not name.strip():
        raise fail("study.name", "must be a non-empty string.")
    trials = get("study", "trials", 50)
    if not isinstance(trials, int) or trials < 1:
        raise fail("study.trials", f"must be a positive integer, got {trials!r}.")

    datasets = [get("stage1", "dataset")] + list(get("stage2", "datasets"))
    for i, ds in enumerate(datasets):
        if ds not in DATASET_NAMES:
            key = "stage1.dataset" if i == 0 else "stage2.datasets"
            raise fail(key, f"unknown dataset {ds!r}; use one of {', '.join(DATASET_NAMES)}.")
    gate = get("stage1", "gate")
    if not isinstance(gate, (int, float)) or isinstance(gate, bool) or not 0 < gate < float("inf"):
        raise fail("stage1.gate", f"must be a number in (0, inf), got {gate!r}; the research's gate is 0.60.")
    for key in ("stage1.epochs", "stage2.epochs"):
        value = get(*key.split("."))
        if not isinstance(value, int) or value < 1:
            raise fail(key, f"must be a positive integer, got {value!r}.")

    kinds = {"tpe", "random"}
    sampler = {"kind": "tpe", "seed": None, "multivariate": True, "constant_liar": True, "n_startup_trials": 10}
    sampler.update(raw.get("sampler", {}))
    if sampler["kind"] not in kinds:
        raise fail("sampler.kind", f"unknown sampler {sampler['kind']!r}; use tpe or random.")
    pruner = {"kind": "median", "n_startup_trials": 5, "n_warmup_steps": 1}
    pruner.update(raw.get("pruner", {}))
    if pruner["kind"] not in PRUNERS:
        raise fail("pruner.kind", f"unknown pruner {pruner['kind']!r}; use one of {', '.join(PRUNERS)}.")

    try:
        data = DataConfig(**raw.get("data", {}))
    except UsageError as exc:
        raise fail("data", str(exc)) from None
    model_fixed = dict(raw.get("model", {}))
    train_fixed = dict(raw.get("train", {}))
    if "randaugment" in train_fixed:
        train_fixed["randaugment"] = tuple(train_fixed["randaugment"])
    try:
        base_model = ModelConfig(**model_fixed)
        train = TrainConfig(**train_fixed)
    except (UsageError, TypeError) as exc:
        raise fail("model/train", str(exc)) from None

    space = tuple(_param_spec(path, name_, spec) for name_, spec in raw.get("space", {}).items())
    if not space:
        raise fail("space", "is empty; declare at least one [space.<parameter>].")
    for p in space:
        if p.name in model_fixed or p.name in train_fixed:
            raise fail(f"space.{p.name}", "is both searched and fixed in [model]/[train]; keep one.")
        # Each end of each range (each choice) must make a valid model / recipe on its own.
        values = p.choices if p.type == "categorical" else (p.low, p.high)
        for value in values:
            try:
                if p.name in field_names(ModelConfig):
                    dataclasses.replace(base_model, **{p.name: _cast(p, value)})
                else:
                    dataclasses.replace(train, **{p.name: _cast(p, value)})
            except UsageError as exc:
                raise fail(f"space.{p.name}", f"the value {value!r} is invalid: {exc}") from None
    return StudyConfig(
        name=name, path=path, trials=trials, space=space, sampler=sampler, pruner=pruner,
        stage1_dataset=datasets[0], stage1_epochs=get("stage1", "epochs"), gate=float(gate),
        stage2_datasets=tuple(datasets[1:]), stage2_epochs=get("stage2", "epochs"), data=data,
        model=model_fixed, train=train, report_epochs=get("report", "epochs", 40),
        report_warmup=get("report", "warmup", train.warmup),
    )


def _cast(p: ParamSpec, value):
    if p.type == "int":
        return int(value)
    if p.type == "float":
        return float(value)
    return value


def _param_spec(path: str, name: str, spec) -> ParamSpec:
    key = f"space.{name}"

    def fail(problem: str) -> UsageError:
        return UsageError(f"{path}: {key}: {problem}")

    if name not in SEARCHABLE:
        raise fail(f"is not a parameter of the model or the recipe; use one of {', '.join(sorted(SEARCHABLE))}.")
    if not isinstance(spec, dict) or spec.get("type") not in PARAM_KEYS:
        raise fail("needs type = \"int\", \"float\" or \"categorical\".")
    for k in spec:
        if k not in PARAM_KEYS[spec["type"]]:
            raise fail(f"unknown key {k!r}; a {spec['type']} parameter takes {', '.join(sorted(PARAM_KEYS[spec['type']]))}.")
    if spec["type"] == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise fail("needs a non-empty list of choices.")
        return ParamSpec(name, "categorical", choices=tuple(choices))
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise fail("needs numeric low and high.")
    if spec["type"] == "int" and not all(isinstance(v, int) for v in (low, high)):
        raise fail("an int parameter needs integer low and high.")
    if low >= high:
        raise fail(f"the range {low}..{high} is empty or inverted; make low < high.")
    if spec.get("log") and low <= 0:
        raise fail("a log-scale range must have low > 0.")
    step = spec.get("step")
    if step is not None and (spec.get("log") or not step > 0):
        raise fail("step must be > 0 and cannot be combined with log.")
    return ParamSpec(name, spec["type"], low=low, high=high, step=step, log=bool(spec.get("log", False)))
