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

from ..config import DataConfig, TrainConfig, UsageError
from ..datasets import DatasetSpec
from . import synthetic
from .files import _torchvision, get_spec
from .mix import BatchMix, Cutout
from .randaugment import BatchRandAugment


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


def _crop(x: torch.Tensor, images: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, size: int) -> torch.Tensor:
    """A size x size window of every image of x at its own offset (oy[i], ox[i]); images is
    arange(len(x)).

    unfold makes a view of every window; indexing it copies only the chosen ones."""
    windows = x.unfold(2, size, 1).unfold(3, size, 1)  # [B, C, offsets_y, offsets_x, size, size]
    return windows[images, :, oy, ox]


class BatchLoader:
    """Draws batches from uint8 tensors on the device; augments whole batches there.

    Training order and augmentation are a function of (seed, epoch): one torch.Generator on the
    device, seeded per epoch, draws the permutation and every augmentation parameter, so drawing a
    batch never waits for the host and dispatches the same ops every time (bench --only ops counts
    them). A training epoch is epoch_order() then batch(indices(order, b)) for every b < len(self);
    iterating does exactly that. Order: crop, flip, RandAugment (uint8 values), normalise, Cutout
    (fill 0: the mean), then CutMix or MixUp on the whole batch; targets are class indices, or probabilities
    (unsmoothed; the loss smooths them) when CutMix or MixUp is on. With train_cfg None a training
    loader only shuffles."""

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
        cfg, (c, h, w) = train_cfg, x.shape[-3:]
        ra = cfg.randaugment if cfg else (0, 0)
        self.randaugment = BatchRandAugment(ra[0], ra[1], c, h, w, x.device) if ra[0] > 0 else None
        self.cutout = Cutout(cfg.cutout, w, x.device) if cfg and cfg.cutout > 0 else None
        self.mix = (
            BatchMix(cfg.cutmix, cfg.mixup, cfg.mixup_prob, spec.num_classes, w, seed, x.device)
            if cfg and (cfg.cutmix > 0 or cfg.mixup > 0)
            else None
        )
        # Normalisation as one multiply-add: x * scale + shift = (x / 255 - mean) / std.
        self.scale, self.shift = 1 / (255 * self.std), -self.mean / self.std
        self.batch_index = torch.arange(min(batch_size, len(x)), device=x.device)
        # One generator for the loader's life, re-seeded per epoch: a CUDA graph that captured the
        # augmentation keeps drawing from the generator it registered (iteration.py).
        self.generator = torch.Generator(device=x.device)

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
        order = self.epoch_order()
        for b in range(len(self)):
            yield self.batch(self.indices(order, b))

    def epoch_order(self) -> torch.Tensor:
        """Start the next training epoch: re-seed the generator with seed + epoch and draw the order."""
        epoch, self.epoch = self.epoch, self.epoch + 1
        self.generator.manual_seed(self.seed + epoch)
        return torch.randperm(len(self.x), generator=self.generator, device=self.x.device)

    def indices(self, order: torch.Tensor, b: int) -> torch.Tensor:
        """The image indices of training batch b of an epoch's order (a view: no kernel)."""
        bs = min(self.batch_size, len(self.x))
        return order[b * bs : (b + 1) * bs]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented training batch of these image indices, drawn from the epoch's generator."""
        return self._augment(self.x[indices], self.y[indices], self.generator)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x.float(), self.scale)

    def _augment(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        cfg, dev, n = self.cfg, x.device, len(x)
        if cfg is None:
            return self._normalise(x), y
        if cfg.crop_padding > 0:
            p, s = cfg.crop_padding, x.shape[-1]
            off = torch.randint(0, 2 * p + 1, (2, n), generator=gen, device=dev)
            x = _crop(F.pad(x, (p, p, p, p)), self.batch_index[:n], off[0], off[1], s)
        if self.spec.hflip:
            flip = torch.rand(n, generator=gen, device=dev) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.randaugment is not None:
            x = self.randaugment(x, gen)
        x = self._normalise(x)
        if self.cutout is not None:
            x = self.cutout(x, gen)
        if self.mix is not None:
            x, y = self.mix(x, y, gen)
        return x, y
