import pickle
import struct
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from torchvision.transforms import v2

from nkat_search.bench import ops
from nkat_search.config import DataConfig, TrainConfig, UsageError, replace
from nkat_search.data import files
from nkat_search.data.augment import RANDAUGMENT_OPS, randaugment_magnitude
from nkat_search.data.files import get_spec
from nkat_search.data.loader import BatchLoader, load_splits
from nkat_search.data.mix import BatchMix
from nkat_search.data.randaugment import BatchRandAugment
from nkat_search.datasets import DATASETS, DatasetSpec

SYNTH = DataConfig(source="synthetic", val_size=100, synthetic_train=600, synthetic_test=200)
SHAPES = {"cifar10": (3, 32, 10), "mnist": (1, 28, 10), "fashion_mnist": (1, 28, 10), "emnist_letters": (1, 28, 26)}
# Every augmentation off: a training loader then only shuffles and normalises.
NO_AUG = TrainConfig(mixup=0, cutmix=0, randaugment=(0, 9), cutout=0, crop_padding=0)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(
        UsageError, match="unknown dataset 'svhn'; use one of cifar10, mnist, fashion_mnist, emnist_letters"
    ):
        get_spec("svhn")


@pytest.mark.parametrize("name", list(DATASETS))
def test_synthetic_splits(name):
    c, s, k = SHAPES[name]
    sp = load_splits(name, SYNTH)
    assert (sp.spec.channels, sp.spec.image_size, sp.spec.num_classes) == (c, s, k)
    assert sp.spec.hflip == (name == "cifar10")
    assert sp.train_x.shape == (500, c, s, s) and sp.val_x.shape == (100, c, s, s) and sp.test_x.shape == (200, c, s, s)
    for x, y in ((sp.train_x, sp.train_y), (sp.val_x, sp.val_y), (sp.test_x, sp.test_y)):
        assert x.dtype == torch.uint8 and y.dtype == torch.int64 and len(x) == len(y)
    labels = torch.cat([sp.train_y, sp.val_y])
    counts = torch.bincount(labels, minlength=k)
    assert len(counts) == k and counts.min() >= 600 // k and counts.max() <= 600 // k + 1  # balanced, 0..k-1
    assert torch.bincount(sp.test_y, minlength=k).min() > 0 and sp.test_y.max() == k - 1
    # Learnable: standardised images correlate best with their own class mean, well above chance.
    z = lambda t: (lambda f: (f - f.mean(1, keepdim=True)) / f.std(1, keepdim=True))(t.float().flatten(1))  # noqa: E731
    means = torch.stack([z(sp.train_x)[sp.train_y == i].mean(0) for i in range(k)])
    assert ((z(sp.val_x) @ means.T).argmax(1) == sp.val_y).float().mean() > 2.5 / k


@pytest.mark.parametrize("name", list(DATASETS))
def test_synthetic_is_deterministic_and_split_seed_moves_the_split(name):
    a, b = load_splits(name, SYNTH), load_splits(name, SYNTH)
    for field in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    other = load_splits(name, replace(SYNTH, split_seed=1))
    assert not torch.equal(other.val_x, a.val_x)
    # Same pool of training images, split differently; the test set does not move.
    pool = lambda s: torch.cat([s.train_x, s.val_x]).flatten(1).sum(1).sort().values  # noqa: E731
    assert torch.equal(pool(a), pool(other)) and torch.equal(other.test_x, a.test_x)
    assert not torch.equal(a.train_x[:200], a.test_x)  # test images come from another stream


def test_synthetic_datasets_differ():
    mnist, fashion = load_splits("mnist", SYNTH), load_splits("fashion_mnist", SYNTH)
    assert (mnist.train_x.float() - fashion.train_x.float()).abs().mean() > 10


def test_val_size_larger_than_the_training_set_is_a_usage_error(tmp_path):
    _write_idx_dataset(tmp_path / "MNIST" / "raw", "", "t10k", *_images(20, 1, 28, 10), *_images(5, 1, 28, 10))
    with pytest.raises(UsageError, match="val_size 20 leaves no training images out of the 20 mnist"):
        load_splits("mnist", DataConfig(root=str(tmp_path), download=False, val_size=20))


# ---------------------------------------------------------------------------------------------
# Real on-disk formats, written tiny


def _images(n, c, s, k, offset=0):
    """Images whose first pixel is their index, so loaded images can be matched to written ones."""
    g = torch.Generator().manual_seed(n + offset)
    x = torch.randint(0, 256, (n, c, s, s), generator=g, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8) + offset
    return x, torch.arange(n) % k


def _idx(path: Path, t: torch.Tensor) -> None:
    # IDX: zero, zero, type 0x08 (uint8), number of dims; then big-endian dims; then the bytes.
    path.write_bytes(
        struct.pack(">BBBB", 0, 0, 8, t.dim()) + struct.pack(f">{t.dim()}I", *t.shape) + t.numpy().tobytes()
    )


def _write_idx_dataset(raw: Path, prefix, test_name, train_x, train_y, test_x, test_y):
    raw.mkdir(parents=True, exist_ok=True)
    for split, x, y in (("train", train_x, train_y), (test_name, test_x, test_y)):
        _idx(raw / f"{prefix}{split}-images-idx3-ubyte", x[:, 0].contiguous())
        _idx(raw / f"{prefix}{split}-labels-idx1-ubyte", y.to(torch.uint8))


def _write_cifar(root: Path, train_x, train_y, test_x, test_y):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(name, x, y):
        # The real batches are Python 2 pickles whose str keys load as str under encoding="latin1".
        entry = {"data": x.reshape(len(x), -1).numpy(), "labels": y.tolist(), "batch_label": name}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))

    for i, (x, y) in enumerate(zip(train_x.chunk(5), train_y.chunk(5)), start=1):
        batch(f"data_batch_{i}", x, y)
    batch("test_batch", test_x, test_y)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}, protocol=2))


@pytest.mark.parametrize("name", list(DATASETS))
def test_torchvision_files_load_offline(name, tmp_path, monkeypatch):
    c, s, k = SHAPES[name]
    train_x, train_y = _images(50, c, s, k)
    test_x, test_y = _images(20, c, s, k, offset=100)
    if name == "cifar10":
        _write_cifar(tmp_path, train_x, train_y, test_x, test_y)
        # torchvision checks CIFAR-10's files against the md5 sums of the real ones, which tiny
        # files cannot match; only that check is replaced (MNIST-style sets check existence only).
        monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    elif name == "emnist_letters":
        # On disk: transposed images and labels 1..26; loaded: upright, 0..25.
        files = (train_x.transpose(-1, -2), train_y + 1, test_x.transpose(-1, -2), test_y + 1)
        _write_idx_dataset(tmp_path / "EMNIST" / "raw", "emnist-letters-", "test", *files)
    else:
        folder = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name]
        _write_idx_dataset(tmp_path / folder / "raw", "", "t10k", train_x, train_y, test_x, test_y)

    sp = load_splits(name, DataConfig(root=str(tmp_path), download=False, val_size=10))
    assert len(sp.val_x) == 10 and len(sp.train_x) == 40
    pool_x, pool_y = torch.cat([sp.train_x, sp.val_x]), torch.cat([sp.train_y, sp.val_y])
    order = pool_x[:, 0, 0, 0].long().argsort()
    assert torch.equal(pool_x[order], train_x) and torch.equal(pool_y[order], train_y)
    assert torch.equal(sp.test_x, test_x) and torch.equal(sp.test_y, test_y)
    assert sp.train_x.dtype == torch.uint8 and sp.train_y.dtype == torch.int64


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cifar10", "cifar-10-batches-py/"),
        ("mnist", "MNIST/raw/ containing train-images-idx3-ubyte"),
        ("fashion_mnist", "FashionMNIST/raw/ containing train-images-idx3-ubyte"),
        ("emnist_letters", "EMNIST/raw/ containing emnist-letters-train-images-idx3-ubyte"),
    ],
)
def test_missing_files_offline_name_the_files_and_root(name, expected, tmp_path):
    with pytest.raises(UsageError) as err:
        load_splits(name, DataConfig(root=str(tmp_path), download=False))
    message = str(err.value)
    assert message.startswith(f"{name} is not under {tmp_path}/") and "download is off" in message
    assert expected in message and "--data-root" in message and "\n" not in message


def test_failed_download_gives_the_short_reason(tmp_path, monkeypatch):
    def no_network(self):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
    with pytest.raises(
        UsageError, match=r"could not be downloaded \(<urlopen error \[Errno -2\] Name or service not known>\)"
    ):
        load_splits("mnist", DataConfig(root=str(tmp_path / "new"), download=True))


def test_a_failed_download_leaves_no_folder_it_made_behind(tmp_path, monkeypatch):
    # torchvision's own download path (it makes the folders, then opens the URL), offline
    def refused(*args, **kwargs):
        raise URLError("[Errno 111] Connection refused")

    monkeypatch.setattr(urllib.request, "urlopen", refused)
    with pytest.raises(UsageError, match="could not be downloaded"):
        load_splits("cifar10", DataConfig(root=str(tmp_path / "data" / "torchvision"), download=True))
    assert list(tmp_path.iterdir()) == []  # data/ too: the download made both folders
    (tmp_path / "mine").mkdir()  # a folder that was there before is the user's: kept
    with pytest.raises(UsageError, match="could not be downloaded"):
        load_splits("mnist", DataConfig(root=str(tmp_path / "mine"), download=True))
    assert (tmp_path / "mine").is_dir()


def test_unwritable_root_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(files.os, "access", lambda path, mode: False)
    with pytest.raises(UsageError, match=f"{tmp_path} is not writable"):
        load_splits("mnist", DataConfig(root=str(tmp_path), download=True))


# ---------------------------------------------------------------------------------------------
# BatchLoader


@pytest.mark.parametrize(
    ("n", "batch", "train", "limit", "expected"),
    [(100, 32, True, 0, 3), (100, 32, False, 0, 4), (96, 32, False, 0, 3), (10, 32, True, 0, 1), (10, 32, False, 0, 1),
     (100, 32, False, 2, 2), (100, 10, True, 3, 3), (100, 32, True, 9, 3)],
)  # fmt: skip
def test_len(n, batch, train, limit, expected):
    x, y = torch.zeros(n, 1, 28, 28, dtype=torch.uint8), torch.zeros(n, dtype=torch.int64)
    loader = BatchLoader(x, y, DATASETS["mnist"], batch, train=train, train_cfg=NO_AUG, limit=limit)
    assert len(loader) == expected and len(list(loader)) == expected


def test_eval_yields_every_image_once_in_order_normalised():
    x, y = _images(70, 3, 32, 10)
    spec = DATASETS["cifar10"]
    batches = list(BatchLoader(x, y, spec, 32, train=False))
    assert [len(b[1]) for b in batches] == [32, 32, 6]
    images, targets = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert images.dtype == torch.float32 and torch.equal(targets, y)
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    assert torch.allclose(images * std + mean, x.float() / 255, atol=1e-5)


def test_train_shuffles_each_epoch_and_covers_the_images():
    x, y = _images(64, 1, 28, 10)
    loader = BatchLoader(x, y, DATASETS["mnist"], 16, train=True, train_cfg=NO_AUG)
    first, second = (
        [int(v * 0.3081 * 255 + 0.1307 * 255 + 0.5) for b in loader for v in b[0][:, 0, 0, 0]] for _ in range(2)
    )
    assert sorted(first) == list(range(64)) and first != second  # every image once, new order each epoch


@pytest.mark.parametrize("name", list(DATASETS))
def test_train_batches_have_shapes_and_soft_targets_sum_to_one(name):
    c, s, k = SHAPES[name]
    x, y = _images(64, c, s, k)
    cfg = TrainConfig(mixup=0.2, cutmix=0.5)
    for images, targets in BatchLoader(x, y, DATASETS[name], 16, train=True, train_cfg=cfg):
        assert images.shape == (16, c, s, s) and images.dtype == torch.float32
        assert targets.shape == (16, k) and targets.dtype == torch.float32
        assert torch.allclose(targets.sum(1), torch.ones(16)) and (targets > 0).sum(1).max() == 2
    images, targets = next(iter(BatchLoader(x, y, DATASETS[name], 16, train=True, train_cfg=NO_AUG)))
    assert targets.dtype == torch.int64 and targets.shape == (16,)


def test_cutmix_probability_one_always_cuts():
    x, y = _images(32, 3, 32, 10)
    cfg = TrainConfig(mixup=0, cutmix=1.0, randaugment=(0, 9), cutout=0, crop_padding=0)
    for images, targets in BatchLoader(x, y, DATASETS["cifar10"], 8, train=True, train_cfg=cfg):
        assert targets.shape == (8, 10) and torch.allclose(targets.sum(1), torch.ones(8))


def _asymmetric(n, c, s):
    x = torch.zeros(n, c, s, s, dtype=torch.uint8)
    x[..., : s // 3] = 255  # bright left third
    return x


@pytest.mark.parametrize("name", list(DATASETS))
def test_hflip_only_where_the_spec_allows(name):
    c, s, _ = SHAPES[name]
    x, y = _asymmetric(64, c, s), torch.zeros(64, dtype=torch.int64)
    loader = BatchLoader(x, y, DATASETS[name], 64, train=True, train_cfg=NO_AUG)
    right_bright = torch.cat([(b[0][:, 0, :, -1] > 0).all(1) for _ in range(3) for b in loader])
    if DATASETS[name].hflip:
        assert 0.2 < right_bright.float().mean() < 0.8  # some flipped, some not
    else:
        assert not right_bright.any()


def test_crop_shifts_per_sample_with_zero_padding():
    x, y = torch.full((64, 1, 28, 28), 255, dtype=torch.uint8), torch.zeros(64, dtype=torch.int64)
    cfg = TrainConfig(mixup=0, cutmix=0, randaugment=(0, 9), cutout=0, crop_padding=4)
    images, _ = next(iter(BatchLoader(x, y, DATASETS["mnist"], 64, train=True, train_cfg=cfg)))
    black = (images[:, 0] < 0).sum((1, 2))  # padded pixels are 0 before normalisation
    assert len(set(black.tolist())) > 5 and black.max() <= 28 * 28 - 20 * 20


def test_cutout_zeroes_one_square_per_sample():
    x, y = torch.full((64, 1, 28, 28), 255, dtype=torch.uint8), torch.zeros(64, dtype=torch.int64)
    cfg = TrainConfig(mixup=0, cutmix=0, randaugment=(0, 9), cutout=8, crop_padding=0)
    images, _ = next(iter(BatchLoader(x, y, DATASETS["mnist"], 64, train=True, train_cfg=cfg)))
    zero = images[:, 0] == 0
    rows, cols = zero.any(2).sum(1), zero.any(1).sum(1)
    assert torch.equal(zero.sum((1, 2)), rows * cols)  # a rectangle: the square, clipped at borders
    assert rows.max() == 8 and cols.max() == 8 and (zero.sum((1, 2)) == 64).sum() > 10 and zero.sum((1, 2)).min() > 0
    assert len({tuple(z.nonzero()[0].tolist()) for z in zero}) > 10  # centres differ per sample


def test_randaugment_draws_per_image_not_per_batch():
    one = _images(1, 3, 32, 10)[0]
    x, y = one.expand(64, -1, -1, -1).contiguous(), torch.zeros(64, dtype=torch.int64)
    cfg = TrainConfig(mixup=0, cutmix=0, randaugment=(2, 9), cutout=0, crop_padding=0)
    spec = DatasetSpec("plain", 3, 32, 10, (0.5,) * 3, (0.25,) * 3, hflip=False)
    images, _ = next(iter(BatchLoader(x, y, spec, 64, train=True, train_cfg=cfg)))
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
    assert len({img.sum().item() for img in images}) >= 20  # one image, many different draws


@pytest.mark.parametrize(("c", "s", "m"), [(1, 28, 9), (3, 32, 17), (1, 28, 10)])
def test_our_randaugment_table_makes_exactly_the_images_torchvision_makes(c, s, m):
    """Every image torchvision's public v2.RandAugment(num_ops=1) makes is one of our table's ops at
    that magnitude, and every op and sign of our table is among them (M=10: Solarize's threshold
    lands on a pixel value, so float rounding must agree)."""
    img = _images(1, c, s, 10)[0][0]
    img[:, s // 4 : 3 * s // 4, s // 4 : 3 * s // 4] //= 3  # a darker centre, so every op changes something
    ours = {}
    for name, (_, _, signed, apply) in RANDAUGMENT_OPS.items():
        magnitude = randaugment_magnitude(name, m, s, s)
        for sign in (1, -1) if signed and magnitude else (1,):
            ours[(name, sign)] = apply(img, sign * magnitude)
    reference, made = v2.RandAugment(num_ops=1, magnitude=m), set()
    for seed in range(150):
        torch.manual_seed(seed)
        out = reference(img)
        matches = {key for key, candidate in ours.items() if torch.equal(candidate, out)}
        assert matches, f"seed {seed}: torchvision made an image that no op of our table makes"
        made |= matches
    assert made == set(ours)


@pytest.mark.parametrize(
    ("op", "m", "expected"),
    [("TranslateX", 9, 3.8066), ("Rotate", 9, 9.0), ("ShearY", 30, 0.3), ("Brightness", 9, 0.27),
     ("Posterize", 9, 7.0), ("Posterize", 30, 4.0), ("Solarize", 9, 0.7), ("Solarize", 0, 1.0), ("Equalize", 9, 0.0)],
)  # fmt: skip
def test_randaugment_magnitudes_on_28px_images(op, m, expected):
    assert randaugment_magnitude(op, m, 28, 28) == pytest.approx(expected, abs=1e-4)


def _varied(n, c, s):
    """Random images with dark, low-contrast, flat and few-valued ones among them, so that every
    op's edge cases (AutoContrast's flat channel, Equalize's empty step) occur."""
    x = _images(n, c, s, 10)[0]
    x[:8] //= 3
    x[8:12] = x[8:12] // 4 + 100
    x[12:14] = 77
    x[14:16, :, :, :5] = 0
    x[16:20] = torch.randint(0, 4, (4, c, s, s), generator=torch.Generator().manual_seed(1), dtype=torch.uint8) * 60
    return x


def _torchvision(images: torch.Tensor, choices: list[int], m: int) -> torch.Tensor:
    """Each image through augment.py's torchvision calls for its choices (2 x op + negative), in turn."""
    names, out = list(RANDAUGMENT_OPS), []
    for img, rounds in zip(images, zip(*choices)):
        for choice in rounds:
            name = names[int(choice) // 2]
            _, _, signed, apply = RANDAUGMENT_OPS[name]
            magnitude = randaugment_magnitude(name, m, img.shape[-2], img.shape[-1])
            img = apply(img, -magnitude if signed and choice % 2 else magnitude)
        out.append(img)
    return torch.stack(out)


@pytest.mark.parametrize(("c", "s", "m"), [(3, 32, 9), (1, 28, 9), (3, 32, 17), (1, 28, 10), (3, 32, 30), (1, 28, 0)])
def test_batched_randaugment_makes_every_op_exactly_as_torchvision(c, s, m):
    """Every op and sign, applied to a whole batch with per-image parameters, gives each image
    exactly what torchvision's call for that op gives it; two rounds of random choices too."""
    x = _varied(64, c, s)
    ra = BatchRandAugment(2, m, c, s, s, torch.device("cpu"))
    for choice in range(2 * len(RANDAUGMENT_OPS)):
        chosen = torch.full((1, 64), choice)
        ours = ra.apply(x, chosen)
        assert ours.dtype == torch.float32 and torch.equal(ours, _torchvision(x, chosen.tolist(), m).float()), choice
    chosen = torch.randint(2 * len(RANDAUGMENT_OPS), (2, 64), generator=torch.Generator().manual_seed(m))
    assert torch.equal(ra.apply(x, chosen), _torchvision(x, chosen.tolist(), m).float())


def test_batched_randaugment_draws_every_op_and_sign_as_often_as_torchvision():
    """One image, 2,800 copies: each output is identified as the (op, sign) that makes it; every op
    comes out 1/14 of the time and a signed op's two signs half each, as v2.RandAugment draws them."""
    img = _images(1, 3, 32, 10)[0][0] // 2 + 60  # 60-187: AutoContrast and Solarize (at 178.5) change it
    img[:, 8:24, 8:24] //= 3  # a darker centre, so that every op changes something
    m, names = 9, list(RANDAUGMENT_OPS)
    made: dict[bytes, set[str]] = {}  # an output's bytes -> the ops that make it
    for choice in range(2 * len(names)):
        made.setdefault(_torchvision(img[None], [[choice]], m)[0].numpy().tobytes(), set()).add(names[choice // 2])
    assert len(made) == 23 and all(len(ops) == 1 for ops in made.values())  # 9 signed ops, 5 unsigned: distinct
    ra = BatchRandAugment(1, m, 3, 32, 32, torch.device("cpu"))
    out = ra(img[None].expand(2800, -1, -1, -1), torch.Generator().manual_seed(0)).to(torch.uint8)
    counts = Counter(image.numpy().tobytes() for image in out)
    assert set(counts) <= set(made)
    per_op = Counter()
    for key, n in counts.items():
        per_op[next(iter(made[key]))] += n
    assert all(abs(per_op[name] - 200) < 60 for name in names), per_op  # 4.4 standard deviations
    signed = [n for key, n in counts.items() if RANDAUGMENT_OPS[next(iter(made[key]))][2]]
    assert len(signed) == 18 and min(signed) > 55  # each sign of the 9 signed ops: about 100


def _mixed(targets: torch.Tensor) -> bool:
    return bool(((targets > 0).sum(1) > 1).any())


@pytest.mark.parametrize("mixup_prob", [0.0, 0.3, 1.0])
def test_mixup_prob_is_the_share_of_batches_mixed(mixup_prob):
    x, y = _images(10, 1, 28, 10)  # ten distinct labels: a mixed batch always shows two classes in a row
    cfg = TrainConfig(mixup=1.0, mixup_prob=mixup_prob, cutmix=0, randaugment=(0, 9), cutout=0, crop_padding=0)
    loader = BatchLoader(x, y, DATASETS["mnist"], 10, train=True, train_cfg=cfg)
    batches = [targets for _ in range(300) for _, targets in loader]
    assert all(
        t.shape == (10, 10) and t.dtype == torch.float32 and torch.allclose(t.sum(1), torch.ones(10)) for t in batches
    )
    share = sum(map(_mixed, batches)) / len(batches)
    assert share == pytest.approx(mixup_prob, abs=0.07)


def test_cutmix_takes_its_share_and_mixup_prob_applies_to_the_rest():
    x, y = _images(10, 1, 28, 10)
    cfg = TrainConfig(mixup=1.0, mixup_prob=0.5, cutmix=0.4, randaugment=(0, 9), cutout=0, crop_padding=0)
    loader = BatchLoader(x, y, DATASETS["mnist"], 10, train=True, train_cfg=cfg)
    batches = [(images, targets) for _ in range(300) for images, targets in loader]
    # A CutMix image is one of two source images pixel by pixel; a MixUp image blends every pixel.
    pixels = {round(v, 4) for img in x.float().div(255).sub(0.1307).div(0.3081) for v in img.flatten().tolist()}
    cut = [all(round(v, 4) in pixels for v in images.flatten()[:200].tolist()) for images, t in batches if _mixed(t)]
    n = len(batches)
    assert sum(cut) / n == pytest.approx(0.4, abs=0.08)  # CutMix batches
    assert (len(cut) - sum(cut)) / n == pytest.approx(0.6 * 0.5, abs=0.08)  # MixUp on half of the rest


def test_same_mix_for_the_images_and_the_labels():
    """A CutMix target's shares are the areas each source image covers; a MixUp image is the same
    blend of its two sources as its target."""
    x = torch.zeros(8, 1, 28, 28, dtype=torch.uint8)
    x[1::2] = 255  # even: black; odd: white; label = parity
    y = torch.arange(8) % 2
    spec = DatasetSpec("plain", 1, 28, 2, (0.0,), (1.0,), hflip=False)
    for kind in ("cutmix", "mixup"):
        cfg = TrainConfig(
            mixup=1.0 if kind == "mixup" else 0,
            cutmix=1.0 if kind == "cutmix" else 0,
            randaugment=(0, 9),
            cutout=0,
            crop_padding=0,
            label_smoothing=0.0,
        )
        for _ in range(5):
            images, targets = next(iter(BatchLoader(x, y, spec, 8, train=True, train_cfg=cfg, seed=_)))
            white = images.mean((1, 2, 3))  # normalisation with mean 0, std 1: pixel fraction
            assert torch.allclose(white, targets[:, 1], atol=1e-5) and torch.allclose(targets.sum(1), torch.ones(8))


def _ks(a: list[float], b: list[float]) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    values = torch.tensor(sorted(a + b))
    cdf = lambda s: torch.searchsorted(torch.tensor(sorted(s)), values, right=True) / len(s)  # noqa: E731
    return float((cdf(a) - cdf(b)).abs().max())


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixing_weights_follow_torchvisions_distributions(kind):
    """The share of each target that is the image's own label (MixUp's lambda at the research's
    alpha 0.1, or the area outside CutMix's box) has the distribution torchvision's v2.MixUp and
    v2.CutMix draw: two samples of 600 batches within the KS test's 1% critical value."""
    x, y = _images(10, 1, 28, 10)  # ten labels in a row: image i's own label is class i
    # Image 1's own share: one draw per batch, rounded so that one area is one value in both samples.
    own = lambda targets: [round(w, 5) for w in targets.diagonal().tolist()[1:2]]  # noqa: E731
    mix = BatchMix(1.0 if kind == "cutmix" else 0, 0.1 if kind == "mixup" else 0, 1.0, 10, 28, 3, "cpu")
    gen = torch.Generator().manual_seed(3)
    ours = [w for _ in range(600) for w in own(mix(x.float(), y, gen)[1])]
    reference = v2.MixUp(alpha=0.1, num_classes=10) if kind == "mixup" else v2.CutMix(alpha=1.0, num_classes=10)
    torch.manual_seed(0)
    theirs = [w for _ in range(600) for w in own(reference(x.float(), y)[1])]
    assert len(ours) == len(theirs) == 600 and _ks(ours, theirs) < 1.63 * (2 / 600) ** 0.5


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_augmentation_dispatches_the_same_few_ops_every_batch_without_a_sync(name):
    """With every augmentation on (the research's recipe), drawing a batch dispatches at most 150
    ops that are not views, none of them sync-prone, and the same ops with the same shapes and the
    same non-tensor arguments every batch: what a CUDA graph can replay (issue 22's CPU target).
    Drawn as the training iteration draws them: batch(indices) of the epoch's order."""
    c, s, k = SHAPES[name]
    x, y = _images(256, c, s, k)
    loader = BatchLoader(x, y, DATASETS[name], 32, train=True, train_cfg=TrainConfig(), seed=1)
    order = loader.epoch_order()
    runs, constants = [], []
    for b in range(3):
        indices = loader.indices(order, b)
        with ops.OpCounter() as counter:
            loader.batch(indices)
        runs.append(counter.ops)
        constants.append(counter.constants)
    kernels = [[op for op, _, _, view in run if not view] for run in runs]
    assert max(map(len, kernels)) <= 150 and min(map(len, kernels)) > 50
    assert [why for run in runs for _, _, why, _ in run if why] == []
    assert all([op[:2] for op in run] == [op[:2] for op in runs[0]] for run in runs)
    assert constants[1] == constants[0] == constants[2]


def test_same_seed_same_batches_other_seed_other_batches():
    x, y = _images(64, 3, 32, 10)
    cfg = TrainConfig()  # every augmentation on

    def epoch(seed, global_seed):
        torch.manual_seed(global_seed)  # the loader's seed alone decides, whatever torch's global RNG holds
        return list(BatchLoader(x, y, DATASETS["cifar10"], 16, train=True, train_cfg=cfg, seed=seed))

    a, b, other = epoch(3, 0), epoch(3, 1), epoch(4, 0)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not torch.equal(a[0][0], other[0][0])
