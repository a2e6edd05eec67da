"""Frozen configuration objects: the one way a model, a training run, a dataset and the search's
sampler and pruner are described.

CLI flags and study files become these dataclasses once, at the edge; everything inside takes
them as arguments. Each dataclass checks its own fields in __post_init__: the type declared in
its annotation (bool is not an int, floats are finite), then the ranges, raising UsageError with
a sentence that names the field and the fix. The CLI's flags are generated from the same fields
(their `help` metadata), so a flag and a study-file key cannot disagree. The study file itself is
read by nkat_search.study.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field


class UsageError(ValueError):
    """A user's mistake: the message is one sentence naming the problem and the fix (exit 2)."""


class RuntimeFailure(RuntimeError):
    """A right command that failed while it ran (a diverging loss, a database gone, no memory): the
    message is one sentence (exit 1). Here, not beside its subclasses, so that the CLI can catch
    them all without importing the training stack."""


# Sizes far beyond any model or recipe this search is for: refused with a sentence instead of a
# traceback from torch (or a run that never ends). Whole numbers must fit in 64 bits.
INT64 = (-(2**63), 2**63 - 1)


MAX_PIXELS = 256  # cutout side and crop padding; the images are 28 or 32 pixels wide


MAX_RANDAUGMENT_OPS = 16


MAX_IMAGES = 10_000_000  # synthetic images, validation images


MAX_SAMPLER_SEED = 2**32 - 1  # Optuna's samplers seed numpy, which takes 32 bits


MAX_EMBED_DIM, MAX_DEPTH, MAX_HEADS, MAX_MLP_RATIO = 16384, 1024, 1024, 64.0


def opt(default, help: str, **meta):
    """A config field with its help text (and optional `choices`, `flag`) for the generated CLI flags."""
    return field(default=default, metadata={"help": help, **meta})


def check_types(obj) -> None:
    """Every field of a config dataclass has its annotated type; ints given for floats become floats,
    lists given for tuples become tuples. Why our own: dataclasses do not check types at all."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        ok, conformed = _conform(value, hints[f.name])
        if not ok:
            big = _beyond_64_bits(value)
            if big is not None:
                digits = str(abs(big))
                raise UsageError(
                    f"{f.name} {'-' if big < 0 else ''}{digits[:12]}... ({len(digits)} digits) does not "
                    f"fit in 64 bits; use a whole number from {INT64[0]} to {INT64[1]}."
                )
            raise UsageError(f"{f.name} must be {_describe(hints[f.name])}, got {_shown(value)}.")
        if conformed is not value:
            object.__setattr__(obj, f.name, conformed)


def _conform(value, kind) -> tuple[bool, object]:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, out = _conform(value, arg)
            if ok:
                return True, out
        return False, value
    if kind is type(None):
        return value is None, value
    if kind is bool:
        return isinstance(value, bool), value
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) and INT64[0] <= value <= INT64[1], value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False, value
        return True, float(value)
    if kind is str:
        return isinstance(value, str), value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            return False, value
        parts: list[object] = []
        for item, arg in zip(value, items):
            ok, conformed = _conform(item, arg)
            if not ok:
                return False, value
            parts.append(conformed)
        return True, tuple(parts)
    if origin is dict or kind is dict:
        return isinstance(value, dict), value
    raise TypeError(f"config fields of type {kind} are not supported")


def _describe(kind) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        item = _describe(args[0]).removeprefix("a ")
        return f"a list of {item}s" if len(args) == 2 and args[1] is Ellipsis else f"a list of {len(args)} {item}s"
    return {
        bool: "true or false",
        int: "a whole number",
        float: "a finite number",
        str: "a string",
        type(None): "absent",
    }.get(kind, str(kind))


def _beyond_64_bits(value) -> int | None:
    """The first whole number in value (or in its list) that does not fit in 64 bits, if any."""
    for item in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(item, int) and not isinstance(item, bool) and not INT64[0] <= item <= INT64[1]:
            return item
    return None


def _shown(value) -> str:
    """A refused value as written, shortened when it is long."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def check_at_most(obj, limits: dict[str, float]) -> None:
    """Each named field of obj is at most its limit (sizes far beyond any model, see MAX_EMBED_DIM)."""
    for name, limit in limits.items():
        if getattr(obj, name) > limit:
            shown = int(limit) if float(limit).is_integer() else limit
            raise UsageError(
                f"{name} {getattr(obj, name)} is far beyond what this search can train; use at most {shown}."
            )


CONV_STEMS = ("off", "tiny", "small")


# Total downsampling of each stem: tiny and small both halve the image twice.
STEM_STRIDE = {"off": 1, "tiny": 4, "small": 4}


PRECISIONS = ("auto", "fp32", "bf16")
GRAPH_MODES = ("auto", "off")


@dataclass(frozen=True)
class ModelConfig:
    """The NKAT ViT (docs/research.md, "The model changes planned for CIFAR-10")."""

    in_chans: int = 3
    img_size: int = 32
    num_classes: int = 10
    conv_stem: str = opt(
        "tiny",
        "hybrid conv stem before the patch embedding: off, tiny (32->64 ch, /4) or small (64->128->128, /4)",
        choices=CONV_STEMS,
    )
    patch_size: int = opt(
        2,
        "patch side on the stem's feature map; must divide it (on 28x28 images a trial uses "
        "the largest divisor of the feature map that is no larger)",
    )
    embed_dim: int = opt(384, "token width; a multiple of num_heads")
    depth: int = opt(7, "number of transformer blocks")
    num_heads: int = opt(8, "attention heads per block")
    mlp_ratio: float = opt(4.0, "MLP hidden width as a multiple of embed_dim")
    temperature: float = opt(0.65, "initial attention temperature (logits are divided by it; learnable per layer), > 0")
    top_k: int = opt(6, "keys kept per query by the top-k filter; 0 = off")
    top_p: float = opt(0.80, "nucleus mass kept per query by the top-p filter, in (0, 1]; 1 = off")
    nkat_strength: float = opt(0.0024, "NKAT modulation strength s of the attention weights (1 + s*r^l*theta); 0 = off")
    nkat_decay: float = opt(0.99, "per-layer decay r of the NKAT strength, in (0, 1]")
    dropout_attn: float = opt(0.17, "dropout on attention weights, in [0, 1)")
    dropout_embed: float = opt(0.08, "dropout after the position embedding, in [0, 1)")
    dropout_head: float = opt(0.1, "dropout in the classification head, in [0, 1)")
    color_norm: bool = opt(True, "colour-wise LayerNorm over each pixel's channels before the stem")
    split_heads: bool = opt(False, "split-head attention: one head per colour channel")
    channel_shuffle: bool = opt(False, "random colour-channel order per training image")

    def __post_init__(self) -> None:
        check_types(self)
        if self.conv_stem not in CONV_STEMS:
            raise UsageError(f"conv_stem {self.conv_stem!r} is unknown; use one of {', '.join(CONV_STEMS)}.")
        if self.in_chans < 1 or self.num_classes < 2 or self.img_size < 1:
            raise UsageError("in_chans must be >= 1, num_classes >= 2 and img_size >= 1.")
        if self.patch_size < 1:
            raise UsageError(f"patch_size must be at least 1, got {self.patch_size}.")
        feature = self.img_size // STEM_STRIDE[self.conv_stem]
        if self.img_size % STEM_STRIDE[self.conv_stem] or feature % self.patch_size:
            divisors = ", ".join(str(d) for d in range(1, feature + 1) if feature % d == 0)
            raise UsageError(
                f"patch_size {self.patch_size} does not divide the {feature}x{feature} feature map that the "
                f"{self.conv_stem!r} stem makes from {self.img_size}x{self.img_size} images; "
                f"pick a divisor of {feature} ({divisors})."
            )
        if self.num_heads < 1:
            raise UsageError(f"num_heads must be at least 1, got {self.num_heads}.")
        if self.embed_dim < 1:
            raise UsageError(
                f"embed_dim must be at least 1, got {self.embed_dim}; use a positive multiple of "
                f"num_heads ({self.num_heads})."
            )
        check_at_most(
            self, {"embed_dim": MAX_EMBED_DIM, "num_heads": MAX_HEADS, "depth": MAX_DEPTH, "mlp_ratio": MAX_MLP_RATIO}
        )
        if self.embed_dim % self.num_heads:
            raise UsageError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}; "
                f"use a positive multiple of {self.num_heads}."
            )
        if self.depth < 1:
            raise UsageError(f"depth must be at least 1, got {self.depth}.")
        if not self.mlp_ratio > 0 or round(self.embed_dim * self.mlp_ratio) < 1:
            raise UsageError(f"mlp_ratio must be > 0 (embed_dim * mlp_ratio >= 1), got {self.mlp_ratio}.")
        if not self.temperature > 0:
            raise UsageError(f"temperature must be > 0, got {self.temperature}; 0.6-1.0 is the searched range.")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}; use 1.0 to turn the filter off.")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0, got {self.top_k}; use 0 to turn the filter off.")
        if self.nkat_strength < 0:
            raise UsageError(f"nkat_strength must be >= 0, got {self.nkat_strength}; use 0 to turn it off.")
        if not 0 < self.nkat_decay <= 1:
            raise UsageError(f"nkat_decay must be in (0, 1], got {self.nkat_decay}.")
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
    """One training run (docs/research.md, "The training recipe planned")."""

    epochs: int = opt(40, "training epochs, each over the whole training split")
    warmup: int = opt(5, "epochs of linear learning-rate warm-up before cosine decay")
    batch_size: int = opt(128, "images per step")
    lr: float = opt(2e-4, "peak AdamW learning rate")
    weight_decay: float = opt(1e-4, "AdamW weight decay on weight matrices")
    ema: float = opt(0.9995, "EMA decay of the weights used for evaluation, in [0, 1); 0 = off")
    clip_grad: float = opt(1.0, "gradient-norm clipping; 0 = off")
    label_smoothing: float = opt(0.1, "label smoothing, in [0, 1)")
    mixup: float = opt(0.1, "MixUp Beta(alpha, alpha) on batches without CutMix; 0 = off")
    mixup_prob: float = opt(1.0, "probability that a batch without CutMix uses MixUp (the research: 0.1 at alpha 0.2)")
    cutmix: float = opt(0.2, "probability that a batch uses CutMix; 0 = off")
    randaugment: tuple[int, int] = opt((2, 9), "RandAugment ops per image N and magnitude M (0-30); N = 0 = off")
    cutout: int = opt(8, "side in pixels of the square erased per image; 0 = off")
    crop_padding: int = opt(4, "random crop after zero padding by this many pixels; 0 = off")
    seed: int = opt(0, "seed of initialisation, batches and augmentation")
    precision: str = opt(
        "auto", "auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32", choices=PRECISIONS
    )
    limit_train: int = opt(0, "at most this many batches per epoch (recorded in the output); 0 = whole epochs")
    compile: bool = opt(False, "torch.compile the model (pays on CUDA for long runs only)")
    graphs: str = opt(
        "auto",
        "auto: on CUDA, capture each training iteration once as a CUDA graph and replay it per batch "
        "(eager if capture fails, with a warning); eager on the CPU and MPS; off: always eager",
        choices=GRAPH_MODES,
    )

    def __post_init__(self) -> None:
        check_types(self)
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
        for name in ("clip_grad", "weight_decay", "mixup", "cutout", "crop_padding", "limit_train"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0, got {getattr(self, name)}; use 0 to turn it off.")
        for name in ("cutmix", "mixup_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise UsageError(f"{name} is a probability in [0, 1], got {getattr(self, name)}.")
        if not 0 <= self.label_smoothing < 1:
            raise UsageError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        check_at_most(self, {"cutout": MAX_PIXELS, "crop_padding": MAX_PIXELS})
        n, m = self.randaugment
        if not 0 <= n <= MAX_RANDAUGMENT_OPS or not 0 <= m <= 30:
            raise UsageError(f"randaugment N M needs 0 <= N <= {MAX_RANDAUGMENT_OPS} and 0 <= M <= 30, got {n} {m}.")
        if self.graphs not in GRAPH_MODES:
            raise UsageError(f"graphs {self.graphs!r} is unknown; use one of {', '.join(GRAPH_MODES)}.")
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision {self.precision!r} is unknown; use one of {', '.join(PRECISIONS)}.")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how the validation split is held out."""

    source: str = opt(
        "torchvision",
        "torchvision: the real datasets under the data root (downloaded when absent "
        "and the network allows); synthetic: generated images with the real shapes "
        "and class counts",
        choices=("torchvision", "synthetic"),
        flag="data_source",
    )
    root: str = opt("data", "folder of the real datasets", flag="data_root")
    val_size: int | None = opt(
        None, "validation images held out from the training set [5000; a tenth of synthetic_train for synthetic data]"
    )
    split_seed: int = opt(0, "seed of the train/validation split")
    download: bool = opt(True, "download a real dataset that is absent")
    synthetic_train: int = opt(10000, "synthetic images generated for train + validation")
    synthetic_test: int = opt(2000, "synthetic test images")

    def __post_init__(self) -> None:
        check_types(self)
        if self.source not in ("torchvision", "synthetic"):
            raise UsageError(f"data source {self.source!r} is unknown; use torchvision or synthetic.")
        if not self.root:
            raise UsageError("the data root is empty; pass a folder.")
        if self.synthetic_train < 2 or self.synthetic_test < 1:
            raise UsageError("synthetic_train must be >= 2 and synthetic_test >= 1.")
        if self.val_size is not None and self.val_size < 1:
            raise UsageError(f"val_size must be at least 1, got {self.val_size}.")
        check_at_most(
            self,
            {
                "synthetic_train": MAX_IMAGES,
                "synthetic_test": MAX_IMAGES,
                **({"val_size": MAX_IMAGES} if self.val_size is not None else {}),
            },
        )
        if self.source == "synthetic" and self.validation_images >= self.synthetic_train:
            raise UsageError(
                f"val_size {self.validation_images} leaves no training images out of synthetic_train "
                f"{self.synthetic_train}; lower val_size or raise synthetic_train."
            )

    @property
    def validation_images(self) -> int:
        if self.val_size is not None:
            return self.val_size
        return max(1, self.synthetic_train // 10) if self.source == "synthetic" else 5000


def replace(cfg, **changes):
    """A copy of a frozen config with some fields changed (validated again)."""
    return dataclasses.replace(cfg, **changes)


def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def adapt_patch_size(img_size: int, conv_stem: str, patch_size: int) -> int:
    """The patch size a trial uses on a dataset of another image size than the one it was searched on.

    A searched patch size is meant for 32x32 CIFAR-10; on 28x28 images the stem's feature map is
    28 or 7 pixels wide, which 2 or 4 may not divide. The rule: the largest divisor of the
    feature map that is at most the requested patch size, so tokens are never coarser than asked.
    """
    feature = img_size // STEM_STRIDE[conv_stem]
    return max(d for d in range(1, patch_size + 1) if feature % d == 0)
