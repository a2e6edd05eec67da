"""RandAugment's operations and magnitudes: the definition, one torchvision functional call per op.

randaugment.py applies these ops to whole batches with per-image parameters (it takes the op list
and the magnitudes from here); the calls below are what tests/test_data.py compares it with, image
by image, and what it compares with v2.RandAugment itself."""

from __future__ import annotations

import math

import torch

# RandAugment (Cubuk et al. 2020) as torchvision's v2.RandAugment defines it, written out here so
# that a torchvision upgrade cannot change our augmentation silently (tests/test_data.py checks
# that every image v2.RandAugment makes is one this table makes). Each op: its magnitude at M = 0
# and at M = 30 (linear between, over 31 bins), whether a random sign applies, and the public
# functional op; geometric ops use nearest interpolation and fill 0 outside the image.
RANDAUGMENT_BINS = 31


class _Functional:
    """torchvision.transforms.v2.functional, imported at its first use.

    Only the reference calls below use it (training applies randaugment.py's batch ops), and its
    import costs about 1.6 s of CPU in a process that has not imported torch._dynamo yet (the
    `start` command's own process, a command refused before it trains); about 0.35 s after
    torch.optim has imported torch._dynamo, as a training process's first optimizer does."""

    def __getattr__(self, name: str):
        from torchvision.transforms.v2 import functional

        return getattr(functional, name)


TF = _Functional()


def _shear(x: torch.Tensor, factor: float, axis: int) -> torch.Tensor:
    # The papers' shear factor is tan(angle); about the top-left corner, as the reference code does.
    angle = math.degrees(math.atan(factor))
    return TF.affine(
        x,
        angle=0.0,
        translate=[0, 0],
        scale=1.0,
        shear=[angle, 0.0] if axis == 0 else [0.0, angle],
        interpolation=TF.InterpolationMode.NEAREST,
        center=[0, 0],
    )


RANDAUGMENT_OPS = {
    "Identity": (0.0, 0.0, False, lambda x, m: x),
    "ShearX": (0.0, 0.3, True, lambda x, m: _shear(x, m, 0)),
    "ShearY": (0.0, 0.3, True, lambda x, m: _shear(x, m, 1)),
    # Translations in whole pixels, up to 150/331 of the side (the paper's 150 px on 331 px images).
    "TranslateX": (
        0.0,
        150 / 331,
        True,
        lambda x, m: TF.affine(
            x, angle=0.0, translate=[int(m), 0], scale=1.0, shear=[0.0, 0.0], interpolation=TF.InterpolationMode.NEAREST
        ),
    ),
    "TranslateY": (
        0.0,
        150 / 331,
        True,
        lambda x, m: TF.affine(
            x, angle=0.0, translate=[0, int(m)], scale=1.0, shear=[0.0, 0.0], interpolation=TF.InterpolationMode.NEAREST
        ),
    ),
    "Rotate": (
        0.0,
        30.0,
        True,
        lambda x, m: TF.rotate(x, angle=m, interpolation=TF.InterpolationMode.NEAREST),
    ),  # degrees
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
