"""Datasets as uint8 tensors on the device, and a loader that augments whole batches there.

Two sources give the same `Splits`: real files read through torchvision, or synthetic images
with each dataset's real shape (for tests and machines without the files). The validation split
is always held out of the training set; the test set is never touched by model selection
(seed-notes, "Defects ... model selection used the test set").
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from . import synthetic
from .config import DataConfig, TrainConfig, UsageError


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    hflip: bool  # only for natural images: a flipped digit or letter is another glyph


# Standard published per-channel statistics of each real training set; synthetic images use the
# same so that a model sees the same input scale from either source.
DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "mnist": DatasetSpec("mnist", 1, 28, 10, (0.1307,), (0.3081,), False),
    "fashion_mnist": DatasetSpec("fashion_mnist", 1, 28, 10, (0.2860,), (0.3530,), False),
    "emnist_letters": DatasetSpec("emnist_letters", 1, 28, 26, (0.1722,), (0.3309,), False),
}


@dataclass
class Splits:
    spec: DatasetSpec
    train_x: torch.Tensor  # uint8 [N, C, H, W] on the target device
    train_y: torch.Tensor  # int64 [N]
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def get_spec(name: str) -> DatasetSpec:
    """The spec of a dataset by name."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}.")
    return DATASETS[name]


def ensure_available(name: str, data: DataConfig) -> None:
    """Download a real dataset when absent, or fail with a UsageError; synthetic data always is."""
    spec = get_spec(name)
    if data.source == "torchvision":
        _torchvision(spec, data)


def load_splits(name: str, data: DataConfig, device: str | torch.device = "cpu") -> Splits:
    """Train/validation/test uint8 tensors of a dataset, moved to `device` once."""
    spec = get_spec(name)
    if data.source == "synthetic":
        train_x, train_y = synthetic.images(spec, data.synthetic_train, stream=1)
        test_x, test_y = synthetic.images(spec, data.synthetic_test, stream=2)
    else:
        train_x, train_y, test_x, test_y = _torchvision(spec, data)
    n = len(train_y)
    val_size = data.validation_images
    if val_size >= n:
        raise UsageError(
            f"val_size {val_size} leaves no training images out of the {n} {name} training images; "
            "lower val_size."
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(data.split_seed))
    val, train = perm[:val_size], perm[val_size:]
    device = torch.device(device)

    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        if device.type == "cuda":
            return t.pin_memory().to(device, non_blocking=True)
        return t.to(device)

    return Splits(
        spec,
        move(train_x[train]), move(train_y[train]),
        move(train_x[val]), move(train_y[val]),
        move(test_x), move(test_y),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Real files through torchvision


def _torchvision(spec: DatasetSpec, data: DataConfig) -> tuple[torch.Tensor, ...]:
    """Train and test images and labels of a real dataset under data.root.

    The files are looked for first and a download is tried only when they are absent, so a
    machine without network fails in one step with a sentence instead of a traceback. CIFAR-10
    goes through torchvision too, so its files are checked against the published md5 sums; the
    tests write tiny files in the real format and replace only that md5 check."""
    root = data.root
    datasets = torchvision.datasets
    build = {
        "cifar10": lambda train, dl: datasets.CIFAR10(root, train=train, download=dl),
        "mnist": lambda train, dl: datasets.MNIST(root, train=train, download=dl),
        "fashion_mnist": lambda train, dl: datasets.FashionMNIST(root, train=train, download=dl),
        "emnist_letters": lambda train, dl: datasets.EMNIST(root, split="letters", train=train, download=dl),
    }[spec.name]
    try:
        train, test = build(True, False), build(False, False)
    except RuntimeError:  # torchvision's "Dataset not found or corrupted"
        if not data.download:
            raise UsageError(_missing(spec.name, root, "download is off")) from None
        if not _writable(root):
            raise UsageError(_missing(spec.name, root, f"{root} is not writable")) from None
        made = _first_missing(Path(root))
        try:
            train, test = build(True, True), build(False, True)
        except Exception as err:  # any network, HTTP, checksum or archive error
            if made is not None:
                _remove_if_only_folders(made)
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            reason = (lines[-1] if lines else type(err).__name__)[:120]
            raise UsageError(_missing(spec.name, root, reason)) from None
    return (*_arrays(spec.name, train), *_arrays(spec.name, test))


def _arrays(name: str, ds) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, C, H, W] images and int64 labels from a torchvision dataset's arrays."""
    if name == "cifar10":
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # stored HWC
        return x.contiguous(), torch.tensor(ds.targets, dtype=torch.int64)
    x, y = ds.data.unsqueeze(1), ds.targets.to(torch.int64)
    if name == "emnist_letters":
        # EMNIST's raw arrays are stored transposed (column-major); labels are 1..26.
        x, y = x.transpose(-1, -2), y - 1
    return x.contiguous(), y


def _idx_files(folder: str, prefix: str, train: str, test: str) -> str:
    names = [f"{prefix}{split}-{kind}-ubyte" for split in (train, test) for kind in ("images-idx3", "labels-idx1")]
    return f"{folder}/ containing {', '.join(names[:-1])} and {names[-1]}"


_FILES = {
    "cifar10": "the extracted cifar-10-batches-py/ (or cifar-10-python.tar.gz, used when download is on)",
    "mnist": _idx_files("MNIST/raw", "", "train", "t10k"),
    "fashion_mnist": _idx_files("FashionMNIST/raw", "", "train", "t10k"),
    "emnist_letters": _idx_files("EMNIST/raw", "emnist-letters-", "train", "test"),
}


def _missing(name: str, root: str, reason: str) -> str:
    return (
        f"{name} is not under {root}/ and could not be downloaded ({reason}); "
        f"place {_FILES[name]} under {root}/ or pass --data-root."
    )


def _first_missing(root: Path) -> Path | None:
    """The outermost folder of root that does not exist yet (root itself, or one above it), or None."""
    path, missing = root.resolve(), None
    while not path.exists():
        path, missing = path.parent, path
    return missing


def _remove_if_only_folders(top: Path) -> None:
    """Remove top, a folder the failed download made, when it holds nothing but folders, so that a
    refused start leaves the user's working folder as it found it. Any file in it (another
    process's download into the same new root, a partial archive) keeps the whole folder; a
    process that has made a folder there but not yet a file can lose it, and then fails its own
    download with the reason, as on any other error."""
    if top.is_dir() and all(p.is_dir() for p in top.rglob("*")):
        shutil.rmtree(top, ignore_errors=True)


def _writable(root: str) -> bool:
    path = Path(root).resolve()
    while not path.exists():
        path = path.parent
    return os.access(path, os.W_OK)


# ---------------------------------------------------------------------------------------------
# Batches


# RandAugment (Cubuk et al. 2020) as torchvision's v2.RandAugment defines it, written out here so
# that a torchvision upgrade cannot change our augmentation silently (tests/test_data.py checks
# that every image v2.RandAugment makes is one this table makes). Each op: its magnitude at M = 0
# and at M = 30 (linear between, over 31 bins), whether a random sign applies, and the public
# functional op; geometric ops use nearest interpolation and fill 0 outside the image.
RANDAUGMENT_BINS = 31
_NEAREST = TF.InterpolationMode.NEAREST


def _shear(x: torch.Tensor, factor: float, axis: int) -> torch.Tensor:
    # The papers' shear factor is tan(angle); about the top-left corner, as the reference code does.
    angle = math.degrees(math.atan(factor))
    return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[angle, 0.0] if axis == 0 else [0.0, angle],
                     interpolation=_NEAREST, center=[0, 0])


RANDAUGMENT_OPS = {
    "Identity": (0.0, 0.0, False, lambda x, m: x),
    "ShearX": (0.0, 0.3, True, lambda x, m: _shear(x, m, 0)),
    "ShearY": (0.0, 0.3, True, lambda x, m: _shear(x, m, 1)),
    # Translations in whole pixels, up to 150/331 of the side (the paper's 150 px on 331 px images).
    "TranslateX": (0.0, 150 / 331, True, lambda x, m: TF.affine(
        x, angle=0.0, translate=[int(m), 0], scale=1.0, shear=[0.0, 0.0], interpolation=_NEAREST)),
    "TranslateY": (0.0, 150 / 331, True, lambda x, m: TF.affine(
        x, angle=0.0, translate=[0, int(m)], scale=1.0, shear=[0.0, 0.0], interpolation=_NEAREST)),
    "Rotate": (0.0, 30.0, True, lambda x, m: TF.rotate(x, angle=m, interpolation=_NEAREST)),  # degrees
    "Brightness": (0.0, 0.9, True, lambda x, m: TF.adjust_brightness(x, 1.0 + m)),
    "Color": (0.0, 0.9, True, lambda x, m: TF.adjust_saturation(x, 1.0 + m)),  # grayscale: unchanged
    "Contrast": (0.0, 0.9, True, lambda x, m: TF.adjust_contrast(x, 1.0 + m)),
    "Sharpness": (0.0, 0.9, True, lambda x, m: TF.adjust_sharpness(x, 1.0 + m)),
    "Posterize": (8.0, 4.0, False, lambda x, m: TF.posterize(x, bits=int(m))),  # bits kept
    # Pixels at or above the threshold (a fraction of 255) are inverted.
    "Solarize": (1.0, 0.0, False, lambda x, m: TF.solarize(x, threshold=255 * m)),
    "AutoContrast": (0.0, 0.0, False, lambda x, m: TF.autocontrast(x)),
    "Equalize": (0.0, 0.0, False, lambda x, m: TF.equalize(x)),
}


def randaugment_magnitude(op: str, m: int, height: int, width: int) -> float:
    """The magnitude of a RandAugment op at bin m (0-30) on height x width images.

    A float32 linspace as torchvision computes it, so that thresholds agree to the bit (Solarize
    at M = 10 is 170.000005, not 170: a pixel of 170 stays)."""
    low, high, _, _ = RANDAUGMENT_OPS[op]
    side = {"TranslateX": width, "TranslateY": height}.get(op, 1)
    value = float(torch.linspace(low * side, high * side, RANDAUGMENT_BINS)[m])
    return float(round(value)) if op == "Posterize" else value


def _crop(x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, size: int) -> torch.Tensor:
    """A size x size window of every image of x at its own offset (oy[i], ox[i]).

    unfold makes a view of every window; indexing it copies only the chosen ones."""
    windows = x.unfold(2, size, 1).unfold(3, size, 1)  # [B, C, offsets_y, offsets_x, size, size]
    return windows[torch.arange(len(x), device=x.device), :, oy, ox]


class BatchLoader:
    """Draws batches from uint8 tensors on the device; augments whole batches there.

    Training order and augmentation are a function of (seed, epoch): a torch.Generator on the
    device draws the permutation, crops, flips and cutout squares; RandAugment's op and sign
    draws, the CutMix/MixUp choice and torchvision's CutMix and MixUp draw from torch's global
    RNG, so they run inside torch.random.fork_rng seeded per batch. Order: crop, flip,
    RandAugment (uint8), normalise, Cutout (fill 0: the mean), then CutMix or MixUp on the whole
    batch; targets are class indices, or probabilities (unsmoothed; the loss smooths them) when
    CutMix or MixUp is on. With train_cfg None a training loader only shuffles."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        spec: DatasetSpec,
        batch_size: int,
        *,
        train: bool,
        train_cfg: TrainConfig | None = None,
        seed: int = 0,
        limit: int = 0,
    ) -> None:
        if len(x) != len(y) or len(x) == 0:
            raise UsageError(f"a loader needs as many labels as images and at least one image, got {len(x)} and {len(y)}.")
        self.x, self.y, self.spec = x, y, spec
        self.batch_size, self.train, self.cfg = batch_size, train, train_cfg
        self.seed, self.limit, self.epoch = seed, limit, 0
        self.mean = torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
        cfg = train_cfg
        h, w = x.shape[-2:]
        # (magnitude, signed, op) of each RandAugment op at the recipe's M, in the table's order.
        self.randaugment = [(randaugment_magnitude(name, cfg.randaugment[1], h, w), signed, apply)
                            for name, (_, _, signed, apply) in RANDAUGMENT_OPS.items()] if cfg else []
        self.cutmix = v2.CutMix(alpha=1.0, num_classes=spec.num_classes) if cfg and cfg.cutmix > 0 else None
        self.mixup = v2.MixUp(alpha=cfg.mixup, num_classes=spec.num_classes) if cfg and cfg.mixup > 0 else None

    def __len__(self) -> int:
        n = len(self.x)
        batches = max(1, n // self.batch_size) if self.train else math.ceil(n / self.batch_size)
        return min(batches, self.limit) if self.limit > 0 else batches

    def __iter__(self):
        if not self.train:
            for i in range(len(self)):
                sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
                yield self._normalise(self.x[sl]), self.y[sl]
            return
        epoch, self.epoch = self.epoch, self.epoch + 1
        gen = torch.Generator(device=self.x.device).manual_seed(self.seed + epoch)
        perm = torch.randperm(len(self.x), generator=gen, device=self.x.device)
        bs = min(self.batch_size, len(self.x))
        for b in range(len(self)):
            idx = perm[b * bs : (b + 1) * bs]
            # Python's hash of a tuple of ints is stable across runs (only str hashing is salted).
            yield self._augment(self.x[idx], self.y[idx], gen, hash((self.seed, epoch, b)) & (2**63 - 1))

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float().div_(255) - self.mean) / self.std

    def _augment(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, batch_seed: int):
        cfg, dev, n = self.cfg, x.device, len(x)
        if cfg is None:
            return self._normalise(x), y
        if cfg.crop_padding > 0:
            p, s = cfg.crop_padding, x.shape[-1]
            off = torch.randint(0, 2 * p + 1, (2, n), generator=gen, device=dev)
            x = _crop(F.pad(x, (p, p, p, p)), off[0], off[1], s)
        if self.spec.hflip:
            flip = torch.rand(n, generator=gen, device=dev) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(batch_seed)
            if cfg.randaugment[0] > 0:
                x = self._randaugment(x, cfg.randaugment[0])
            x = self._normalise(x)
            if cfg.cutout > 0:
                x = self._cutout(x, cfg.cutout, gen)
            if self.cutmix is not None or self.mixup is not None:
                # CPU draws decide CutMix vs MixUp, so there is no device sync per batch.
                draw = torch.rand(2)
                if self.cutmix is not None and draw[0] < cfg.cutmix:
                    x, y = self.cutmix(x, y)
                elif self.mixup is not None and draw[1] < cfg.mixup_prob:
                    x, y = self.mixup(x, y)
                else:  # unmixed: still probabilities, so that a loader yields one kind of target
                    y = F.one_hot(y, self.spec.num_classes).float()
        return x, y

    def _randaugment(self, x: torch.Tensor, num_ops: int) -> torch.Tensor:
        """RandAugment with its own ops and signs for every image (as the paper and torchvision draw
        them), applied op by op to the images that drew it: at most num_ops x 26 calls per batch,
        whatever its size. The draws come from torch's CPU RNG (seeded per batch), so choosing the
        images never waits for the device."""
        n = len(x)
        x = x.clone()
        for _ in range(num_ops):
            op, negative = torch.randint(len(self.randaugment), (n,)), torch.rand(n) <= 0.5
            for i, (magnitude, signed, apply) in enumerate(self.randaugment):
                for sign in ((1.0, -1.0) if signed and magnitude else (1.0,)):
                    chosen = (op == i) & (negative == (sign < 0)) if signed and magnitude else op == i
                    idx = chosen.nonzero().squeeze(1)
                    if len(idx):
                        idx = idx.to(x.device, non_blocking=True)
                        x[idx] = apply(x[idx], sign * magnitude)
        return x

    @staticmethod
    def _cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
        """Zero (the mean, after normalisation) a size x size square at a random centre per image,
        clipped at the border as in DeVries & Taylor (2017)."""
        n, _, h, w = x.shape
        centre = torch.rand(2, n, generator=gen, device=x.device)
        top = (centre[0] * h).long() - size // 2
        left = (centre[1] * w).long() - size // 2
        rows = torch.arange(h, device=x.device)[None, :]
        cols = torch.arange(w, device=x.device)[None, :]
        in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)
        in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)
        return x.masked_fill(in_rows[:, None, :, None] & in_cols[:, None, None, :], 0.0)
