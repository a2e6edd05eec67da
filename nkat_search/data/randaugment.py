"""RandAugment on a whole batch on the device: every image its own ops, no host in the loop.

augment.py defines the ops through torchvision's functional calls, one magnitude per call; this
module applies them with per-image parameters, so that a batch dispatches the same ops every time
and never waits for the host. tests/test_data.py checks every op and sign, image by image, against
augment.py's torchvision calls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .augment import RANDAUGMENT_OPS, randaugment_magnitude

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
SMOOTH = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))  # / 13: torchvision's Sharpness kernel
BLENDS = ("Brightness", "Color", "Contrast", "Sharpness")
_RATIO, _OFFSET = 0, 1  # columns of the per-choice parameter table
_CONTRAST, _AUTOCONTRAST, _EQUALIZE = 0, 1, 2  # columns of the per-choice flag table


def inverse_affine(
    angle: float, translate: tuple[float, float], shear: tuple[float, float], centre: tuple[float, float]
):
    """The inverse affine matrix (2 x 3, a flat list) that torchvision's affine and rotate sample
    with at scale 1: rotation and shear in degrees, centre relative to the image's middle.

    Ours because torchvision's helper is private; the same arithmetic in the same order (floats on
    the host), so that the grids agree with TF.affine and TF.rotate to the bit."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    (cx, cy), (tx, ty) = centre, translate
    cos_sy, tan_sx = math.cos(sy), math.tan(sx)
    a = math.cos(rot - sy) / cos_sy
    b = -(a * tan_sx + math.sin(rot))
    c = math.sin(rot - sy) / cos_sy
    d = math.cos(rot) - c * tan_sx
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] += cx - m[0] * (cx + tx) - m[1] * (cy + ty)
    m[5] += cy - m[3] * (cx + tx) - m[4] * (cy + ty)
    return m


def _geometry(op: str, magnitude: float, height: int, width: int) -> list[float]:
    """The inverse affine matrix of a geometric op at a signed magnitude (the identity for the
    other ops), as augment.py's TF.affine and TF.rotate calls build it."""
    corner = (-width * 0.5, -height * 0.5)  # center=[0, 0]: the top-left corner
    if op in ("ShearX", "ShearY"):
        angle = math.degrees(math.atan(magnitude))
        return inverse_affine(0.0, (0.0, 0.0), (angle, 0.0) if op == "ShearX" else (0.0, angle), corner)
    if op in ("TranslateX", "TranslateY"):
        shift = (float(int(magnitude)), 0.0) if op == "TranslateX" else (0.0, float(int(magnitude)))
        return inverse_affine(0.0, shift, (0.0, 0.0), (0.0, 0.0))
    if op == "Rotate":
        return inverse_affine(-magnitude, (0.0, 0.0), (0.0, 0.0), (0.0, 0.0))  # rotate's sign convention
    return [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def _blend(op: str, value: float, channels: int, height: int, width: int):
    """A choice's blend: the degenerate's kernel [C, C, 3, 3] (black for the non-blends), the map
    of 1 - ratio [H, W] (0: x stays), and its (ratio, rounding offset) row."""
    kernel, one_minus, row = torch.zeros(channels, channels, 3, 3), torch.zeros(height, width), [1.0, 0.0]
    if op not in BLENDS or (op == "Color" and channels == 1):  # grayscale: Color is the identity
        return kernel, one_minus, row
    # torchvision multiplies by the factor (1 + magnitude) and by 1 - factor, each a float32 of a double.
    row[_RATIO] = 1.0 + value
    one_minus.fill_(1.0 - (1.0 + value))
    if op in ("Color", "Contrast"):  # the grayscale (Contrast then takes its mean), floored
        kernel[:, :, 1, 1] = torch.tensor(GRAY) if channels == 3 else 1.0
    elif op == "Sharpness":
        # x + (1 - factor) * (blur - x), as torchvision writes it: the kernel makes blur - x, rounded
        # (never at .5: a sum of integers / 13), and the 1-pixel border stays.
        kernel[range(channels), range(channels)] = torch.tensor(SMOOTH) / 13.0
        kernel[range(channels), range(channels), 1, 1] -= 1.0
        row[_RATIO], row[_OFFSET] = 1.0, 0.5
        one_minus[[0, -1], :], one_minus[:, [0, -1]] = 0.0, 0.0
    return kernel, one_minus, row


def _table(op: str, value: float) -> torch.Tensor:
    """A choice's 256-entry lookup table: Posterize and Solarize, or the identity."""
    v = torch.arange(256, dtype=torch.float32)
    if op == "Posterize":
        step = float(2 ** (8 - int(value)))  # the low bits cleared
        return torch.floor(v / step) * step
    if op == "Solarize":
        return torch.where(v >= 255 * value, 255.0 - v, v)
    return v


class BatchRandAugment:
    """RandAugment on a whole batch: every image draws its own op and sign on the device (one of
    2 x 14 choices, uniform: the op uniform and the sign fair, as torchvision draws them), and
    every op runs on every image with that image's parameters; an image that did not draw an op
    gets the op's identity parameters. Per round:

    - geometry (ShearX/Y, TranslateX/Y, Rotate): one grid_sample, nearest, zero fill;
    - blends (Brightness, Color, Contrast, Sharpness): x * ratio + degenerate * (1 - ratio), the
      degenerate from one 3 x 3 convolution with a kernel per image (black, grayscale, blur - x),
      or the grayscale's mean for Contrast; Sharpness keeps a 1-pixel border;
    - lookup tables (Posterize, Solarize, AutoContrast, Equalize): one 256-entry table per image
      and channel, from the choice's table or the image's range or histogram, applied by a gather.

    So every batch dispatches the same ops with the same shapes, and nothing reads the device:
    what a CUDA graph can record. The choices of all rounds pick their matrices, kernels, tables
    and flags from per-choice tables built here, once per batch.

    Why not torchvision's v2.RandAugment or functional ops: they take one magnitude per call, so a
    batch with an op per image needs a call per (op, sign) group of images, chosen on the host
    (about 50 groups and a nonzero each per batch), and TF.autocontrast assigns through a boolean
    mask (a sync on CUDA). The arithmetic is torchvision's, to the bit on the CPU. Images are float
    tensors holding the uint8 values 0-255."""

    def __init__(self, num_ops: int, m: int, channels: int, height: int, width: int, device: torch.device) -> None:
        self.num_ops = num_ops
        thetas, kernels, one_minus, rows, tables, flags = [], [], [], [], [], []
        for name, (_, _, signed, _) in RANDAUGMENT_OPS.items():
            magnitude = randaugment_magnitude(name, m, height, width)
            for sign in (1.0, -1.0):  # choice = 2 * op + (the image drew the negative sign)
                value = sign * magnitude if signed else magnitude
                thetas.append(_geometry(name, value, height, width))
                kernel, ones, row = _blend(name, value, channels, height, width)
                kernels.append(kernel)
                one_minus.append(ones)
                rows.append(row)
                tables.append(_table(name, value))
                flags.append([name == "Contrast", name == "AutoContrast", name == "Equalize"])
        # As torchvision's _affine_grid: each matrix transposed and scaled to grid_sample's [-1, 1].
        theta = torch.tensor(thetas, dtype=torch.float32).view(-1, 2, 3).transpose(1, 2)
        self.theta = theta.div(torch.tensor([0.5 * width, 0.5 * height])).to(device)
        self.kernels = torch.stack(kernels).to(device)  # [choices, C, C, 3, 3]
        self.one_minus = torch.stack(one_minus)[:, None].to(device)  # [choices, 1, H, W]
        self.params = torch.tensor(rows, dtype=torch.float32, device=device)
        self.tables = torch.stack(tables)[:, None].to(device)  # [choices, 1, 256]
        self.flags = torch.tensor(flags, device=device)
        xs = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width)
        ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height)
        base = torch.stack([xs.expand(height, width), ys[:, None].expand(height, width), torch.ones(height, width)], -1)
        self.base = base.view(1, height * width, 3).to(device)
        self.values = torch.arange(256, dtype=torch.float32, device=device)
        self.one = torch.ones((), device=device)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        choice = torch.randint(len(self.params), (self.num_ops, len(x)), generator=gen, device=x.device)
        return self.apply(x, choice)

    def apply(self, x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """x (uint8 or float values 0-255) augmented with choice[r, i] (2 x op + negative) for
        image i in round r; float."""
        (n, c, h, w), k = x.shape, len(choice)
        choice = choice.flatten()
        grids = self.base.expand(k * n, -1, -1).bmm(self.theta[choice]).view(k, n, h, w, 2)
        kernels = self.kernels[choice].view(k, n * c, c, 3, 3)
        one_minus = self.one_minus[choice].view(k, n, 1, h, w)
        params = self.params[choice].view(k, n, -1, 1, 1, 1).unbind(2)  # each [k, n, 1, 1, 1]
        tables = self.tables[choice].view(k, n, 1, 256)
        flags = self.flags[choice].view(k, n, -1, 1, 1).unbind(2)  # each [k, n, 1, 1]
        x = x.float()
        for r in range(k):
            x = F.grid_sample(x, grids[r], mode="nearest", padding_mode="zeros", align_corners=False)
            ratio, offset, contrast = params[_RATIO][r], params[_OFFSET][r], flags[_CONTRAST][r, ..., None]
            # The degenerate: black, the grayscale (floored), its mean (Contrast) or blur - x (rounded).
            degenerate = F.conv2d(x.view(1, n * c, h, w), kernels[r], padding=1, groups=n).view(n, c, h, w)
            degenerate = (degenerate + offset).floor()
            degenerate = torch.where(contrast, degenerate[:, :1].mean((2, 3), keepdim=True), degenerate)
            x = torch.addcmul(x * ratio, degenerate, one_minus[r]).clamp(0, 255).floor().view(n, c, h * w)
            x = self._lookup(x, tables[r], flags[_AUTOCONTRAST][r], flags[_EQUALIZE][r]).view(n, c, h, w)
        return x

    def _lookup(self, x: torch.Tensor, table: torch.Tensor, autocontrast: torch.Tensor, equalize: torch.Tensor):
        """Each image's table ([n, 1, 256]: Posterize, Solarize or the identity), or its AutoContrast or
        Equalize table ([n, C, 256]) where it drew one, applied to its pixels (x: [n, C, H * W], the
        uint8 values as floats; the ranges and the histogram are taken in float, which every device
        reduces)."""
        pixels = x.long()
        low, high = x.aminmax(dim=-1, keepdim=True)
        table = torch.where(autocontrast, self._autocontrast(low, high), table)
        table = torch.where(equalize, self._equalize(x, pixels, high), table)
        return table.gather(-1, pixels)

    def _autocontrast(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """torchvision's autocontrast as a table: each channel's range stretched to 0-255, a flat
        channel left as it is (masked_fill where torchvision assigns through a boolean mask)."""
        flat = high == low
        inv_scale = ((high - low) * (1.0 / 255)).masked_fill(flat, 1.0)
        return ((self.values - low.masked_fill(flat, 0.0)) / inv_scale).clamp(0, 255).floor()

    def _equalize(self, x: torch.Tensor, pixels: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """torchvision's equalize (PIL's table: each value maps to the count of smaller pixels, in
        steps of 1/255 of the pixels below the maximum, rounded; the identity when that step is 0).
        Ours because TF.equalize returns the image, and here a table is what the ops share."""
        hist = torch.zeros(*pixels.shape[:-1], 256, device=pixels.device)
        hist.scatter_add_(-1, pixels, self.one.expand(pixels.shape))
        step = torch.floor((x < high).sum(-1, keepdim=True) / 255)
        table = torch.floor((hist.cumsum(-1) - hist + torch.floor(step / 2)) / step.clamp(min=1)).clamp(0, 255)
        return torch.where(step > 0, table, self.values)
