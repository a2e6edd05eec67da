"""A picture of what a model trains on: one augmented batch as a PNG grid of labelled images.

The images come from the same BatchLoader that fit() uses, so the grid shows every augmentation
of the recipe (crop, flip, RandAugment, Cutout, CutMix, MixUp), denormalised back to pixels.
Labels are the targets before label smoothing (which the loss applies): one class ("3"), or the
two largest shares of a CutMix/MixUp mix ("3 .62 / 8 .38").
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from ..config import TrainConfig
from ..data.loader import BatchLoader, Splits


def label_text(target: torch.Tensor, names: tuple[str, ...] | None = None) -> str:
    """'3' for a class index or a one-class target; '3 .62 / 8 .38' for a mix of two or more."""
    name = (lambda i: names[i]) if names else str
    if target.ndim == 0:
        return name(int(target))
    shares, classes = target.float().topk(min(2, len(target)))
    if shares[1] < 0.005:  # a mix that rounds to one class
        return name(int(classes[0]))
    return " / ".join(f"{name(int(c))} {s:.2f}".replace(" 0.", " .") for s, c in zip(shares, classes))


def recipe_text(cfg: TrainConfig) -> str:
    """The augmentation fields of a recipe, in one line for the grid's title."""
    n, m = cfg.randaugment
    return (
        f"crop pad {cfg.crop_padding}, randaugment {n}/{m}, cutout {cfg.cutout}, "
        f"cutmix p {cfg.cutmix}, mixup alpha {cfg.mixup} p {cfg.mixup_prob}, label smoothing {cfg.label_smoothing}"
    )


def write_grid(
    train_cfg: TrainConfig,
    splits: Splits,
    out_path: str | Path,
    rows: int = 8,
    cols: int = 8,
    seed: int = 0,
    title: str | None = None,
) -> Path:
    """Write a rows x cols PNG grid of the first training batch that train_cfg makes from splits."""
    loader = BatchLoader(
        splits.train_x, splits.train_y, splits.spec, rows * cols, train=True, train_cfg=train_cfg, seed=seed
    )
    images, targets = next(iter(loader))
    images = (images.float() * loader.std + loader.mean).clamp_(0, 1).cpu()
    targets = targets.cpu()

    fig = Figure(figsize=(cols * 1.1, rows * 1.25 + 0.5), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= len(images):
            continue
        img = images[i]
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(label_text(targets[i], splits.spec.class_names), fontsize=7, pad=2)
    fig.suptitle(title or f"{splits.spec.name}: {recipe_text(train_cfg)}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
