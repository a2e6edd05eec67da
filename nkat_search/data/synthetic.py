"""Synthetic look-alikes of the four datasets, drawn from shape definitions in this file.

- mnist: the ten digits as pen strokes; emnist_letters: the 26 letters, each class upper or lower
  case (as in EMNIST letters), as pen strokes. Random affine distortion, a smooth elastic warp
  and a random stroke width per image; white ink on black, a 20-pixel glyph box in 28x28.
- fashion_mnist: ten garment silhouettes (T-shirt, trouser, pullover, dress, coat, sandal, shirt,
  sneaker, bag, ankle boot) with seams, collars, zips and straps as darker lines, a fabric
  brightness and a stripe or mottled pattern per image, warped like the glyphs.
- cifar10: ten object silhouettes (airplane, automobile, bird, cat, deer, dog, frog, horse, ship,
  truck) in a class-typical colour, with a second colour for wheels, windows, wings or eyes, on a
  textured scene (sky, grass, water, road, indoor, forest) that each class prefers but does not
  own; random size, place, tilt and mirror image.

How: each class's shape becomes, once, a distance field on a fine grid around its unit box (the
prototype; shapes.py holds the shapes and their fields). Every image samples its class's prototype through its own affine + elastic warp (one
grid_sample per chunk of images) and turns the distance into ink with its own stroke width. No
fonts, no files, no Python work per image; a few thousand images take a fraction of a second.

Determinism: the shapes depend on nothing; the images of (dataset, stream) depend on those two
only (train and test use different streams). Object colours carry hue, not only brightness: the
model's colour-wise LayerNorm keeps only the hue of each pixel (docs/research.md).
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .shapes import glyph_fields, shape_fields

if TYPE_CHECKING:
    from ..datasets import DatasetSpec


CHUNK = 1024  # images warped at once (bounds memory: CHUNK x channels x shapes.FIELD^2 floats)


def _uniform(g: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _smooth_noise(g: torch.Generator, n: int, channels: int, size: int, cells: int) -> torch.Tensor:
    """Unit-scale noise [n, channels, size, size] that varies over about size/cells pixels."""
    coarse = torch.randn(n, channels, cells, cells, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _warp(
    fields: torch.Tensor,
    index: torch.Tensor,
    g: torch.Generator,
    size: int,
    box: torch.Tensor,
    *,
    rotate: float,
    shear: float,
    stretch: float,
    shift: float,
    elastic: float,
    mirror: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's prototype fields[index[i]] seen through a random warp: ([n, C, size, size]
    values, [n, 2, size, size] glyph coordinates of each pixel, for patterns that follow the shape).

    box[i]: side of the unit box in pixels. Angles in degrees; stretch: log-scale spread of each
    axis; shift: offset of the centre in pixels; elastic: displacement in glyph units."""
    n = len(index)
    angle = torch.deg2rad(_uniform(g, n, -rotate, rotate))
    sx = torch.exp(_uniform(g, n, -stretch, stretch))
    sy = torch.exp(_uniform(g, n, -stretch, stretch))
    sh = _uniform(g, n, -shear, shear)
    if mirror:
        sx = torch.where(torch.rand(n, generator=g) < 0.5, -sx, sx)
    # Pixel -> glyph coordinates: A = R(angle) @ [[1/sx, sh], [0, 1/sy]] / box.
    cos, sin = angle.cos(), angle.sin()
    a = (
        torch.stack(
            (torch.stack((cos / sx, cos * sh - sin / sy), 1), torch.stack((sin / sx, sin * sh + cos / sy), 1)), 1
        )
        / box[:, None, None]
    )  # [n, 2, 2]
    centre = (torch.rand(n, 2, generator=g) * 2 - 1) * shift
    c = torch.arange(size, dtype=torch.float32) + 0.5 - size / 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    pix = torch.stack((xx, yy), -1)  # [S, S, 2]
    coords = torch.einsum("nij,nhwj->nhwi", a, pix - centre[:, None, None, :])
    coords = coords + elastic * _smooth_noise(g, n, 2, size, 3).permute(0, 2, 3, 1)
    out = torch.empty(n, fields.shape[1], size, size)
    for start in range(0, n, CHUNK):
        sl = slice(start, start + CHUNK)
        # The field spans [-0.5, 1.5]: the unit box's centre 0.5 is its middle, half-width 1.
        out[sl] = F.grid_sample(
            fields[index[sl]], coords[sl], mode="bilinear", padding_mode="border", align_corners=False
        )
    return out, (coords + 0.5).permute(0, 3, 1, 2)


def _ink(distance: torch.Tensor, width: torch.Tensor, pixel: torch.Tensor) -> torch.Tensor:
    """Coverage in [0, 1] of a pen of half-width `width` at `distance`, antialiased over one pixel."""
    return ((width - distance) / pixel + 0.5).clamp_(0, 1)


def _hsv(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HSV in [0, 1] (broadcastable [n, 1, H, W]) -> RGB [n, 3, H, W]."""
    k = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    t = (k + h * 6) % 6
    return v - v * s * torch.minimum(t, 4 - t).clamp(0, 1)


def _labels(g: torch.Generator, n: int, k: int) -> torch.Tensor:
    """Balanced labels 0..k-1 in random order."""
    return (torch.arange(n) % k)[torch.randperm(n, generator=g)]


def _glyph_images(g: torch.Generator, y: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
    n = len(y)
    box = _uniform(g, n, 18, 21)
    dist, _ = _warp(fields, y, g, 28, box, rotate=8, shear=0.12, stretch=0.08, shift=1.0, elastic=0.02)
    width = _uniform(g, n, 0.055, 0.09).view(n, 1, 1, 1)  # half-width in glyph units: 2-3.6 px strokes
    gain = _uniform(g, n, 0.8, 1.0).view(n, 1, 1, 1)
    return _ink(dist, width, 1 / box.view(n, 1, 1, 1)) * gain


def mnist(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    y = _labels(g, n, 10)
    return _glyph_images(g, y, glyph_fields("digits")), y


def emnist_letters(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    y = _labels(g, n, 26)
    lower = torch.rand(n, generator=g) < 0.5  # EMNIST letters: one class for both cases
    return _glyph_images(g, y + 26 * lower, glyph_fields("letters")), y


def fashion_mnist(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    y = _labels(g, n, 10)
    box = _uniform(g, n, 22, 26)
    fields, coords = _warp(
        shape_fields("garments"), y, g, 28, box, rotate=8, shear=0.12, stretch=0.18, shift=1.0, elastic=0.02
    )
    body, detail = fields.unbind(1)
    pixel = 1 / box.view(n, 1, 1)
    shape = _ink(body, torch.zeros(1), pixel)
    seams = _ink(detail, torch.full((1,), 0.025), pixel)
    fabric = _uniform(g, n, 0.3, 1.0).view(n, 1, 1)
    # A pattern per image: stripes at a random angle and frequency, or a mottled print.
    angle = _uniform(g, n, 0, math.pi).view(n, 1, 1)
    freq = _uniform(g, n, 3, 9).view(n, 1, 1)
    stripes = torch.cos(2 * math.pi * freq * (coords[:, 0] * angle.cos() + coords[:, 1] * angle.sin()))
    mottled = _smooth_noise(g, n, 1, 28, 6)[:, 0]
    striped = (torch.rand(n, generator=g) < 0.4).view(n, 1, 1)
    amount = _uniform(g, n, 0.0, 0.3).view(n, 1, 1)
    pattern = 1 + amount * torch.where(striped, stripes, mottled.clamp(-1.5, 1.5) / 1.5)
    image = shape * fabric * pattern * (1 - 0.6 * seams)
    return image[:, None], y


SCENES = {  # hue, saturation, value of the ground; whether the top of the picture is sky (a horizon)
    "sky": (0.58, 0.45, 0.85, False),
    "grass": (0.27, 0.6, 0.55, True),
    "water": (0.55, 0.7, 0.5, True),
    "road": (0.08, 0.25, 0.5, True),
    "indoor": (0.07, 0.45, 0.65, False),
    "forest": (0.33, 0.65, 0.35, False),
}


SKY = (0.58, 0.4)


# Per class: how often it appears on each scene (order of SCENES), object hue centre and spread,
# saturation range. Scenes are typical, not decisive: several classes share each one.
CLASS_LOOKS = [
    ((6, 1, 1, 1, 0, 0), 0.05, 0.1, (0.15, 0.5)),  # airplane
    ((0, 0, 0, 6, 1, 1), 0.0, 0.5, (0.5, 0.95)),  # automobile
    ((4, 2, 1, 0, 0, 2), 0.1, 0.3, (0.4, 0.9)),  # bird
    ((0, 1, 0, 1, 6, 0), 0.08, 0.08, (0.2, 0.7)),  # cat
    ((0, 3, 0, 0, 0, 5), 0.07, 0.04, (0.5, 0.8)),  # deer
    ((0, 4, 0, 1, 4, 0), 0.08, 0.06, (0.3, 0.8)),  # dog
    ((0, 4, 2, 0, 0, 2), 0.3, 0.1, (0.5, 0.9)),  # frog
    ((0, 5, 0, 1, 0, 2), 0.05, 0.04, (0.4, 0.8)),  # horse
    ((1, 0, 7, 0, 0, 0), 0.0, 0.5, (0.3, 0.9)),  # ship
    ((0, 1, 0, 6, 1, 1), 0.0, 0.5, (0.5, 0.95)),  # truck
]


def cifar10(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    y, s = _labels(g, n, 10), 32
    col = lambda i: torch.tensor([look[i] for look in CLASS_LOOKS], dtype=torch.float32)[y]  # noqa: E731
    # The object: a hue around its class's, a second colour (dark or light) for its parts.
    obj_h = (col(1) + col(2) * (torch.rand(n, generator=g) * 2 - 1)) % 1
    sat = col(3)
    obj_s = sat[:, 0] + (sat[:, 1] - sat[:, 0]) * torch.rand(n, generator=g)
    obj_v = _uniform(g, n, 0.45, 0.95)
    part_h = (obj_h + _uniform(g, n, 0.25, 0.75)) % 1
    part_v = torch.where(torch.rand(n, generator=g) < 0.5, 0.2, 0.9)

    # The scene: a textured ground in the scene's colour, under a sky when it has a horizon.
    scene = torch.multinomial(col(0), 1, generator=g)[:, 0]
    ground = torch.tensor([v[:3] for v in SCENES.values()])[scene]
    horizon = torch.tensor([v[3] for v in SCENES.values()])[scene].view(n, 1, 1)
    rows = (torch.arange(s, dtype=torch.float32) + 0.5).view(1, s, 1) / s
    sky = horizon & (rows < _uniform(g, n, 0.15, 0.5).view(n, 1, 1))
    # Keep the object apart from the ground in hue: the model's colour-wise LayerNorm keeps only hue.
    gap = (obj_h - ground[:, 0] + 0.5) % 1 - 0.5
    ground_h = ground[:, 0] - torch.where(gap.abs() < 0.15, 0.3 * torch.sign(gap + 1e-6), 0.0)
    ground_h = ground_h + _uniform(g, n, -0.05, 0.05)
    texture = _smooth_noise(g, n, 2, s, 8)
    bg_h = torch.where(sky, SKY[0], ground_h.view(n, 1, 1)) + 0.03 * texture[:, 0]
    bg_s = torch.where(sky, SKY[1], ground[:, 1].view(n, 1, 1)) * _uniform(g, n, 0.7, 1.2).view(n, 1, 1)
    bg_v = torch.where(
        sky, 0.9 - 0.3 * rows + 0.05 * texture[:, 1], ground[:, 2].view(n, 1, 1) * (1 + 0.25 * texture[:, 1])
    )

    box = _uniform(g, n, 18, 28)
    fields, _ = _warp(
        shape_fields("objects"), y, g, s, box, rotate=10, shear=0.1, stretch=0.12, shift=4.0, elastic=0.015, mirror=True
    )
    pixel = 1 / box.view(n, 1, 1, 1)
    body = _ink(fields[:, :1], torch.zeros(1), pixel)
    part = _ink(fields[:, 1:], torch.zeros(1), pixel) * body
    shade = 1 - 0.35 * rows[:, None]  # lit from above
    one = lambda t: t.view(n, 1, 1, 1)  # noqa: E731
    background = _hsv(bg_h[:, None] % 1, bg_s[:, None].clamp(0, 1), bg_v[:, None].clamp(0, 1))
    obj = _hsv(one(obj_h), one(obj_s), one(obj_v) * shade)
    second = _hsv(one(part_h), torch.full((n, 1, 1, 1), 0.6), one(part_v))
    image = torch.lerp(torch.lerp(background, obj, body), second, part)
    return image + 0.02 * torch.randn(n, 3, s, s, generator=g), y


GENERATORS = {"mnist": mnist, "emnist_letters": emnist_letters, "fashion_mnist": fashion_mnist, "cifar10": cifar10}


def images(spec: DatasetSpec, n: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n uint8 images [n, C, H, W] and int64 labels of a dataset's look-alike; `stream` picks the
    sample (train and test use different streams), the same for the same (dataset, n, stream)."""
    g = torch.Generator().manual_seed(zlib.crc32(spec.name.encode()) + 1_000_003 * stream)
    x, y = GENERATORS[spec.name](g, n)
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8), y


def write_samples(spec: DatasetSpec, out_path, per_class: int = 6, stream: int = 1):
    """A PNG sheet of the look-alike: one column per class (named as in the real dataset), per_class rows."""
    from pathlib import Path

    from matplotlib.figure import Figure

    k = spec.num_classes
    x, y = images(spec, k * per_class * 3, stream)
    fig = Figure(figsize=(k * 0.62, per_class * 0.62 + 0.55), dpi=100)
    axes = fig.subplots(per_class, k, squeeze=False)
    for c in range(k):
        for r, i in enumerate((y == c).nonzero()[:per_class, 0].tolist()):
            img = x[i].permute(1, 2, 0).numpy()
            axes[r, c].imshow(img[..., 0] if spec.channels == 1 else img, cmap="gray", vmin=0, vmax=255)
        axes[0, c].set_title(spec.class_name(c), fontsize=7)
        for ax in axes[:, c]:
            ax.set_axis_off()
    fig.suptitle(f"synthetic {spec.name}: {per_class} images per class (nkat_search/data/synthetic.py)", fontsize=8)
    fig.subplots_adjust(
        left=0.01, right=0.99, bottom=0.01, top=1 - 0.45 / (per_class * 0.62 + 0.55), wspace=0.05, hspace=0.05
    )
    out_path = Path(out_path)
    fig.savefig(out_path)
    return out_path
