"""Cutout, CutMix and MixUp on whole batches, every parameter drawn on the device.

Each batch dispatches the same ops whatever it draws: a square or box is the product of two rows
of a table of bands built at start (band[c, i]: pixel i lies in the band around c), and "neither
CutMix nor MixUp" is a weight of 1, not a branch on the host."""

from __future__ import annotations

import torch

BETA_POOL = 1 << 16  # MixUp's Beta(alpha, alpha) draws, made once per loader


def _bands(size: int, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """bands[..., i] = starts <= i < ends, for pixels 0..size-1."""
    i = torch.arange(size)
    return (i >= starts[..., None]) & (i < ends[..., None])


class Cutout:
    """A size x size square set to 0 (after normalisation: the mean) at a centre drawn uniformly
    over the pixels of each image, clipped at the border (DeVries & Taylor 2017)."""

    def __init__(self, size: int, image_size: int, device: torch.device) -> None:
        centre = torch.arange(image_size)
        self.image_size = image_size
        self.bands = _bands(image_size, centre - size // 2, centre - size // 2 + size).to(device)  # [centre, i]

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        centre = torch.randint(self.image_size, (2, len(x)), generator=gen, device=x.device)
        rows, cols = self.bands[centre]  # each [n, S]
        return x.masked_fill((rows[:, :, None] & cols[:, None, :])[:, None], 0.0)


class BatchMix:
    """CutMix (with probability `cutmix`), else MixUp (with probability `mixup_prob`, lambda from
    Beta(alpha, alpha)), of a batch with itself rolled by one, as torchvision's v2.CutMix and
    v2.MixUp define them: one box or one lambda per batch; a CutMix box has a centre uniform over
    the pixels and sides sqrt(1 - lambda) of the image's (lambda uniform), clipped at the border;
    the targets are mixed by the share of the image outside the box, or by lambda. Targets are
    probabilities, unmixed ones too. The image weight is a map: 1 outside the box and 0 inside it,
    lambda everywhere, or 1 (neither), applied with torch.lerp, exact at 0 and 1.

    Why not v2.CutMix and v2.MixUp: they draw on the host (torch's global RNG, Python floats), so
    a recorded CUDA graph would replay one box and one lambda forever, and choosing between them is
    a host branch. torch has no Beta sampler that takes a generator, so MixUp's lambdas are
    BETA_POOL draws of torch.distributions.Beta made once per loader (seeded), one picked per
    batch."""

    def __init__(
        self, cutmix: float, mixup: float, mixup_prob: float, num_classes: int, image_size: int, seed: int, device
    ) -> None:
        self.cutmix, self.mixup_prob, self.size = cutmix, mixup_prob, image_size
        self.eye = torch.eye(num_classes, device=device)
        self.one = torch.ones((), device=device)
        self.pool = None
        if mixup > 0:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                alpha = torch.tensor(float(mixup))
                self.pool = torch.distributions.Beta(alpha, alpha).sample((BETA_POOL,)).to(device)
        # bands[c, h, i]: pixel i in the box's side around centre c with half side h, clipped.
        centre, half = torch.arange(image_size)[:, None], torch.arange(image_size // 2 + 1)[None, :]
        self.bands = _bands(image_size, (centre - half).clamp(min=0), (centre + half).clamp(max=image_size))
        self.bands = self.bands.float().to(device)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.rand(6, generator=gen, device=x.device)
        image_weight = label_weight = self.one
        if self.pool is not None:
            lam = self.pool[(u[5:6] * BETA_POOL).long()]
            image_weight = label_weight = torch.where(u[1] < self.mixup_prob, lam, self.one)
        if self.cutmix > 0:
            cut = u[0] < self.cutmix
            # v2.CutMix: half sides int(0.5 * sqrt(1 - lambda) * side), the centre randint(side).
            half = (1 - u[2:3]).sqrt().mul(0.5 * self.size).long()
            rows, cols = self.bands[(u[3:5] * self.size).long(), half]  # each [S]
            inside = rows[:, None] * cols[None, :]
            image_weight = torch.where(cut, 1 - inside, image_weight)
            label_weight = torch.where(cut, 1 - inside.mean(), label_weight)
        targets = self.eye[y]
        mixed = torch.lerp(x.roll(1, 0), x, image_weight)
        return mixed, torch.lerp(targets.roll(1, 0), targets, label_weight)
