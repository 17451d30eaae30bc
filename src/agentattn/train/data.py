"""Data sources for ``agentattn train`` / ``eval``: Fashion-MNIST from IDX files, or an image folder.

``data="fashion-mnist"`` (or ``"fashion-mnist:DIR"``) reads the gzipped IDX files that Debian's
``dataset-fashion-mnist`` package installs in ``/usr/share/datasets/fashion-mnist``. The images stay
grayscale: the models take ``in_chans=1``, so repeating the channel three times would only triple the cost of
the first patch embedding without adding information.

``data="imagefolder:PATH"`` reads ``PATH/train`` and ``PATH/val`` with torchvision's ``ImageFolder`` and timm's
transforms (ImageNet mean/std, RGB, ``in_chans=3``).

The epoch order comes from :class:`EpochSampler`: a permutation computed from ``seed + epoch`` alone, split
across ranks like ``DistributedSampler``, so a resumed run can skip exactly the batches it already consumed.
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, Subset

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "DataBundle",
    "EpochSampler",
    "FashionMNIST",
    "build_data",
    "load_fashion_mnist",
    "read_idx",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# Mean and std of the 60k training pixels in [0, 1].
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_INSTALL_HINT = (
    "install it with `sudo apt-get install dataset-fashion-mnist` or set data to 'fashion-mnist:DIR'"
)


def read_idx(path: str | Path, expected_ndim: int) -> np.ndarray:
    """Read one (optionally gzipped) IDX file of unsigned bytes.

    The header is two zero bytes, a type code (0x08 = uint8), the number of dimensions, then one big-endian
    uint32 per dimension; the payload must hold exactly the product of the sizes.

    Returns:
        uint8 array, e.g. (N, 28, 28) for images (``expected_ndim=3``) or (N,) for labels (``expected_ndim=1``).

    Raises:
        ValueError: a missing file, a bad magic number, or a payload of the wrong size (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise ValueError(f"{path}: unreadable or corrupted ({err})") from err
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expected_ndim:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} "
            f"(expected 0x000008{expected_ndim:02x}: unsigned bytes, {expected_ndim} dimensions)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(shape)
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX payload has {len(raw) - header} bytes, the header {shape} says {expected} "
            "(truncated or corrupted)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(root: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the ``train`` (60k) or ``test`` (10k) split.

    Raises:
        ValueError: missing or corrupted files, with the package to install.
    """
    root = Path(root)
    if split not in _FILES:
        raise ValueError(f"fashion-mnist has splits 'train' and 'test', not {split!r}")
    image_file, label_file = (root / name for name in _FILES[split])
    for path in (image_file, label_file):
        if not path.is_file():
            raise ValueError(f"Fashion-MNIST file {path} is missing: {_INSTALL_HINT}")
    images, labels = read_idx(image_file, 3), read_idx(label_file, 1)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{image_file}: images are {images.shape[1:]}, Fashion-MNIST images are 28×28")
    if len(images) != len(labels):
        raise ValueError(f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{label_file}: label {labels.max()} is out of range 0..9")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class FashionMNIST(Dataset):
    """Normalised Fashion-MNIST tensors, held in memory.

    ``dataset[i]`` is ``(image, label)`` with image (1, S, S) float32 (S = 28, or ``img_size`` by bilinear
    resize) and label an int.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, img_size: int = 28) -> None:
        x = images.unsqueeze(1).float().div_(255.0)
        if img_size != x.shape[-1]:
            x = torch.nn.functional.interpolate(x, size=(img_size, img_size), mode="bilinear", antialias=True)
        self.images = (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


@dataclass
class DataBundle:
    """What the loop needs to know about a data source."""

    train: Dataset | None
    eval: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    class_names: list[str] = field(default_factory=list)
    eval_split: str = "test"


def _subset(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    # Deterministic subset: a permutation from the seed, sorted so that a subset of a subset is predictable.
    if n is None or n <= 0 or n >= len(dataset):  # type: ignore[arg-type]
        return dataset
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:n].sort().values  # type: ignore[arg-type]
    return Subset(dataset, idx.tolist())


def parse_data_spec(spec: str) -> tuple[str, Path | None]:
    """``fashion-mnist`` / ``fashion-mnist:DIR`` / ``imagefolder:PATH`` -> (kind, path or None)."""
    kind, _, path = spec.partition(":")
    if kind not in ("fashion-mnist", "imagefolder"):
        raise ValueError(
            f"data must be 'fashion-mnist', 'fashion-mnist:DIR' or 'imagefolder:PATH', got {spec!r}"
        )
    if kind == "imagefolder" and not path:
        raise ValueError(f"data {spec!r} needs a path: 'imagefolder:PATH' (with PATH/train and PATH/val)")
    return kind, Path(path) if path else None


def build_data(
    spec: str,
    *,
    img_size: int | None = None,
    train_subset: int | None = None,
    eval_subset: int | None = None,
    seed: int = 0,
    eval_split: str | None = None,
    with_train: bool = True,
    train_transform: dict | None = None,
) -> DataBundle:
    """Build the train and evaluation datasets of a ``data`` spec.

    Args:
        spec: ``fashion-mnist``, ``fashion-mnist:DIR`` or ``imagefolder:PATH``.
        img_size: model input side (default 28 for Fashion-MNIST, 224 for image folders).
        train_subset, eval_subset: keep that many samples, chosen deterministically from ``seed``.
        eval_split: ``test``/``train`` for Fashion-MNIST; ``val``/``train`` for image folders (``test`` = ``val``).
        with_train: also build the training set (``eval`` does not need it).
        train_transform: extra ``timm.data.create_transform`` kwargs for image folders (``auto_augment``,
            ``color_jitter``, ``re_prob``, ``interpolation``).

    Raises:
        ValueError: a missing dataset or folder (the message says what to install or pass).
    """
    kind, path = parse_data_spec(spec)
    if kind == "fashion-mnist":
        root = path or FASHION_MNIST_DIR
        size = img_size or 28
        split = eval_split or "test"
        train = FashionMNIST(*load_fashion_mnist(root, "train"), size) if with_train else None
        evalset = FashionMNIST(*load_fashion_mnist(root, split), size)
        return DataBundle(
            train=_subset(train, train_subset, seed) if train is not None else None,
            eval=_subset(evalset, eval_subset, seed),
            num_classes=10,
            in_chans=1,
            img_size=size,
            class_names=list(FASHION_MNIST_CLASSES),
            eval_split=split,
        )

    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    assert path is not None
    size = img_size or 224
    split = {"test": "val", None: "val"}.get(eval_split, eval_split)
    if not (path / split).is_dir():
        raise ValueError(
            f"image folder {path / split} is missing: data='imagefolder:PATH' needs PATH/{split}/"
        )
    eval_tf = create_transform(size, is_training=False, interpolation="bicubic", crop_pct=224 / 256)
    evalset = ImageFolder(str(path / split), transform=eval_tf)
    train = None
    if with_train:
        if not (path / "train").is_dir():
            raise ValueError(
                f"image folder {path / 'train'} is missing: data='imagefolder:PATH' needs PATH/train/"
            )
        train_tf = create_transform(size, is_training=True, **(train_transform or {}))
        train = ImageFolder(str(path / "train"), transform=train_tf)
        if train.classes != evalset.classes:
            raise ValueError(f"{path}: train/ and {split}/ have different class folders")
    return DataBundle(
        train=_subset(train, train_subset, seed) if train is not None else None,
        eval=_subset(evalset, eval_subset, seed),
        num_classes=len(evalset.classes),
        in_chans=3,
        img_size=size,
        class_names=list(evalset.classes),
        eval_split=split,
    )


class EpochSampler(Sampler[int]):
    """Shuffled indices for one rank; the order depends only on ``(seed, epoch)``.

    Like ``DistributedSampler(drop_last=True)``: the permutation of ``seed + epoch`` is cut to a multiple of
    ``num_replicas`` and rank ``r`` takes every ``num_replicas``-th index from ``r``. ``skip`` drops the first
    indices of this rank's share (the batches a resumed run already consumed).
    """

    def __init__(
        self, size: int, seed: int, epoch: int = 0, rank: int = 0, num_replicas: int = 1, skip: int = 0
    ) -> None:
        self.size, self.seed, self.epoch = size, seed, epoch
        self.rank, self.num_replicas, self.skip = rank, num_replicas, skip

    def indices(self) -> list[int]:
        """This rank's full index list for the epoch, before ``skip``."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        per_rank = self.size // self.num_replicas
        return order[: per_rank * self.num_replicas][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.skip :])

    def __len__(self) -> int:
        return max(0, self.size // self.num_replicas - self.skip)
