"""Frozen configuration objects: the one way a model, a training run and a dataset are described.

CLI flags and study files become these dataclasses once, at the edge; everything inside takes
them as arguments. Each dataclass validates itself in __post_init__ and raises UsageError with a
sentence that names the field and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


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
