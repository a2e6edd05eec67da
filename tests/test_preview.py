import pytest
import torch
from matplotlib.image import imread

from nkat_search.config import TrainConfig
from nkat_search.data.loader import Splits
from nkat_search.datasets import DATASETS
from nkat_search.outputs.preview import label_text, write_grid

NO_AUG = TrainConfig(mixup=0, cutmix=0, randaugment=(0, 9), cutout=0, crop_padding=0)


def _splits(n: int, value: int) -> Splits:
    x, y = torch.full((n, 1, 28, 28), value, dtype=torch.uint8), torch.arange(n) % 10
    return Splits(DATASETS["mnist"], x, y, x[:4], y[:4], x[:4], y[:4])


def _runs(mask) -> int:
    """Number of runs of True in a 1-D boolean array."""
    mask = torch.as_tensor(mask).int()
    return int((mask[1:] > mask[:-1]).sum() + mask[0])


@pytest.mark.parametrize(("rows", "cols"), [(3, 5), (2, 2)])
def test_write_grid_writes_a_png_of_rows_x_cols_images(tmp_path, rows, cols):
    out = write_grid(NO_AUG, _splits(40, 128), tmp_path / "sub" / "grid.png", rows=rows, cols=cols)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = torch.from_numpy(imread(out))[..., :3]
    # Every image is the same mid-grey (pixel 128, denormalised): find the panels by that colour;
    # grey pixels of the anti-aliased label text are too few to make a column or row of their own.
    grey = ((png - 128 / 255).abs() < 0.01).all(-1)
    assert _runs(grey.sum(0) > 30) == cols and _runs(grey.sum(1) > 30) == rows


@pytest.mark.parametrize(
    ("target", "names", "expected"),
    [(torch.tensor(3), None, "3"),
     (torch.tensor([0, 0, 0, 0.62, 0, 0, 0, 0, 0.38, 0]), None, "3 .62 / 8 .38"),
     (torch.tensor([0, 0, 0, 0.999, 0, 0, 0, 0, 0.001, 0]), None, "3"),
     (torch.tensor([0.3, 0.7]), ("a", "b"), "b .70 / a .30"),
     (torch.tensor(1), ("a", "b"), "b")],
)  # fmt: skip
def test_label_text(target, names, expected):
    assert label_text(target, names) == expected


def test_write_grid_shows_mixed_labels(tmp_path):
    """With CutMix on every batch the grid draws, its targets are mixes: the grid still renders."""
    cfg = TrainConfig(mixup=0, cutmix=1.0, randaugment=(0, 9), cutout=0, crop_padding=0)
    out = write_grid(cfg, _splits(16, 200), tmp_path / "mix.png", rows=2, cols=2, title="cutmix")
    assert imread(out).shape[:2] == (2 * 125 + 50, 2 * 110)
