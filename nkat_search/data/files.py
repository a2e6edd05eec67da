"""The real datasets on disk: torchvision's files (IDX, CIFAR batches), checks that they are there, and
the download that puts them there."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..config import DataConfig, UsageError
from ..datasets import DATASETS, DatasetSpec


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


def _torchvision(spec: DatasetSpec, data: DataConfig) -> tuple[torch.Tensor, ...]:
    """Train and test images and labels of a real dataset under data.root.

    The files are looked for first and a download is tried only when they are absent, so a
    machine without network fails in one step with a sentence instead of a traceback. CIFAR-10
    goes through torchvision too, so its files are checked against the published md5 sums; the
    tests write tiny files in the real format and replace only that md5 check."""
    import torchvision  # here, not at the top: synthetic data never needs it (augment.py's _Functional says why)

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
