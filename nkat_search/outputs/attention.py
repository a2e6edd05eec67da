"""Class-token attention maps of a retrained trial over validation images."""

from __future__ import annotations

from pathlib import Path

import optuna
import torch
import torch.nn.functional as F

from ..config import UsageError
from ..search.study_file import StudyConfig
from .tables import datasets_of


def _image_for_display(x: torch.Tensor):
    """uint8 [C, H, W] -> an array matplotlib shows (H, W, 3) or (H, W)."""
    img = x.permute(1, 2, 0).cpu().numpy()
    return img[..., 0] if img.shape[-1] == 1 else img


def attention_figures(model, images: torch.Tensor, labels: torch.Tensor, spec, out: str | Path) -> list[str]:
    """One PNG per image (the image, then each layer's class-token attention over it) and summary.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..data.loader import BatchLoader

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    ((x, _),) = BatchLoader(images.to(device), labels.to(device), spec, len(images), train=False)
    model.eval()
    with torch.no_grad():
        predicted = model(x).argmax(dim=-1).cpu()
        maps = model.attention_maps(x).float().cpu()  # [depth, B, num_patches]
    depth, count, patches = maps.shape
    side = int(round(patches**0.5))
    size = images.shape[-1]
    grids = maps.view(depth, count, 1, side, side)
    upsampled = torch.stack(
        [F.interpolate(g, size=(size, size), mode="bilinear", align_corners=False)[:, 0] for g in grids]
    ).numpy()  # [depth, B, H, W]
    cmap = "gray" if images.shape[1] == 1 else None
    paths = []

    def draw_row(axes, i: int) -> None:
        axes[0].imshow(_image_for_display(images[i]), cmap=cmap)
        axes[0].set_title(f"label {labels[i].item()}, pred {predicted[i].item()}", fontsize=8)
        # The map over a grey copy of the image: colour in the overlay is attention, not the picture.
        grey = images[i].float().mean(dim=0).numpy()
        for layer in range(depth):
            axes[layer + 1].imshow(grey, cmap="gray")
            axes[layer + 1].imshow(upsampled[layer, i], cmap="inferno", alpha=0.6)
            axes[layer + 1].set_title(f"layer {layer + 1}", fontsize=8)
        for ax in axes:
            ax.axis("off")

    for i in range(count):
        fig, axes = plt.subplots(1, depth + 1, figsize=(2 * (depth + 1), 2.3), squeeze=False)
        draw_row(axes[0], i)
        fig.suptitle(f"{spec.name} validation image {i}: class-token attention per layer", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        path = out / f"attention_{i:02d}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(str(path))
    fig, axes = plt.subplots(count, depth + 1, figsize=(1.6 * (depth + 1), 1.7 * count), squeeze=False)
    for i in range(count):
        draw_row(axes[i], i)
    fig.suptitle(f"{spec.name}: class-token attention, {count} validation images x {depth} layers", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (1.7 * count)))
    path = out / "summary.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(str(path))
    return paths


def retrained_weights(study: optuna.Study, trial_number: int, dataset: str) -> dict:
    """The record `nkat-search report` left for a trial's retrained model on a dataset."""
    from .official import WEIGHTS_ATTR

    numbers = {t.number for t in study.get_trials(deepcopy=False)}
    if trial_number not in numbers:
        raise UsageError(
            f"study {study.study_name!r} has no trial {trial_number}; pass the number of one of its "
            "trials (see `nkat-search leaderboard`)."
        )
    record = study.user_attrs.get(WEIGHTS_ATTR.format(number=trial_number), {}).get(dataset)
    if record is None:
        raise UsageError(
            f"trial {trial_number} has no retrained {dataset} model; run `nkat-search report "
            f"--study {study.study_name}` (with --top large enough to include trial {trial_number}) "
            "first."
        )
    return record


def attention(
    study: optuna.Study,
    config: StudyConfig,
    trial_number: int,
    dataset: str,
    images: int,
    out: str | Path,
    artifacts: str | Path,
) -> list[str]:
    """Attention PNGs of the retrained model of a trial over the first `images` validation images."""
    from optuna.artifacts import FileSystemArtifactStore

    from ..data.loader import load_splits
    from .weights import load_model

    if images < 1:
        raise UsageError(f"--images must be at least 1, got {images}.")
    if dataset not in datasets_of(config):
        raise UsageError(
            f"{dataset} is not a dataset of study {study.study_name!r}; use one of {', '.join(datasets_of(config))}."
        )
    record = retrained_weights(study, trial_number, dataset)
    store = FileSystemArtifactStore(base_path=str(artifacts))
    model = load_model(record["artifact_id"], artifact_store=store)
    splits = load_splits(dataset, config.data, "cpu")
    count = min(images, len(splits.val_y))
    return attention_figures(model, splits.val_x[:count], splits.val_y[:count], splits.spec, out)
