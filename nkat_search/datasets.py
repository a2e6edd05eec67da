"""The one dataset registry: each dataset's image shape, classes, normalisation, whether a flip keeps
its meaning, and its class names. It imports nothing of ours, so that configuration, data loading
and the outputs all read the same facts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    hflip: bool  # only for natural images: a flipped digit or letter is another glyph
    class_names: tuple[str, ...] = ()  # empty: the class index is its name (digits)

    def class_name(self, index: int) -> str:
        return self.class_names[index] if self.class_names else str(index)


# Standard published per-channel statistics of each real training set; synthetic images use the
# same so that a model sees the same input scale from either source.
DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        "cifar10",
        3,
        32,
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        True,
        ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    ),
    "mnist": DatasetSpec("mnist", 1, 28, 10, (0.1307,), (0.3081,), False),
    "fashion_mnist": DatasetSpec(
        "fashion_mnist",
        1,
        28,
        10,
        (0.2860,),
        (0.3530,),
        False,
        ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"),
    ),
    "emnist_letters": DatasetSpec(
        "emnist_letters", 1, 28, 26, (0.1722,), (0.3309,), False, tuple("abcdefghijklmnopqrstuvwxyz")
    ),
}

NAMES = tuple(DATASETS)
