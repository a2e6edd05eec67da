"""Datasets as uint8 tensors on the device, and a loader that augments whole batches there.

Two sources give the same `Splits`: real files read through torchvision, or synthetic images
with each dataset's real shape (for tests and machines without the files). The validation split
is always held out of the training set; the test set is never touched by model selection
(docs/research.md, "Defects ... model selection used the test set").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from ..config import DataConfig, TrainConfig, UsageError
from ..datasets import DatasetSpec
from . import synthetic
from .augment import RANDAUGMENT_OPS, randaugment_magnitude
from .files import _torchvision, get_spec


@dataclass
class Splits:
    spec: DatasetSpec
    train_x: torch.Tensor  # uint8 [N, C, H, W] on the target device
    train_y: torch.Tensor  # int64 [N]
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


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
            f"val_size {val_size} leaves no training images out of the {n} {name} training images; lower val_size."
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
            raise UsageError(
                f"a loader needs as many labels as images and at least one image, got {len(x)} and {len(y)}."
            )
        self.x, self.y, self.spec = x, y, spec
        self.batch_size, self.train, self.cfg = batch_size, train, train_cfg
        self.seed, self.limit, self.epoch = seed, limit, 0
        self.mean = torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
        cfg = train_cfg
        h, w = x.shape[-2:]
        # (magnitude, signed, op) of each RandAugment op at the recipe's M, in the table's order.
        self.randaugment = (
            [
                (randaugment_magnitude(name, cfg.randaugment[1], h, w), signed, apply)
                for name, (_, _, signed, apply) in RANDAUGMENT_OPS.items()
            ]
            if cfg
            else []
        )
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
                for sign in (1.0, -1.0) if signed and magnitude else (1.0,):
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
