"""IDX parsing, the Fashion-MNIST error messages, deterministic subsets and the epoch sampler."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from agentattn.train.data import EpochSampler, build_data, load_fashion_mnist, read_idx

from . import needs_fashion_mnist


def _write_idx(path, array: np.ndarray, magic: bytes | None = None) -> None:
    header = magic or bytes([0, 0, 8, array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip(tmp_path):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    _write_idx(tmp_path / "x.gz", images)
    out = read_idx(tmp_path / "x.gz", 3)
    assert out.shape == (3, 28, 28) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    _write_idx(tmp_path / "magic.gz", np.zeros((2, 28, 28)), magic=bytes([0, 0, 9, 3]))  # 0x09: int8
    with pytest.raises(ValueError, match=r"magic\.gz: bad IDX magic number 0x00000903"):
        read_idx(tmp_path / "magic.gz", 3)
    _write_idx(tmp_path / "dims.gz", np.zeros((2, 28, 28)))
    with pytest.raises(ValueError, match="bad IDX magic"):
        read_idx(tmp_path / "dims.gz", 1)  # a label file has one dimension
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 5, 28, 28) + bytes(100))
    with pytest.raises(ValueError, match=r"short\.gz: IDX payload has 100 bytes"):
        read_idx(tmp_path / "short.gz", 3)
    (tmp_path / "notgz.gz").write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match=r"notgz\.gz: unreadable or corrupted"):
        read_idx(tmp_path / "notgz.gz", 3)


def test_missing_dataset_names_the_package(tmp_path):
    with pytest.raises(ValueError) as info:
        load_fashion_mnist(tmp_path, "train")
    msg = str(info.value)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in msg
    assert "dataset-fashion-mnist" in msg and "apt-get install" in msg
    with pytest.raises(ValueError, match="dataset-fashion-mnist"):
        build_data(f"fashion-mnist:{tmp_path}")


def test_labels_must_match_images(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((4, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3))
    with pytest.raises(ValueError, match=r"has 4 images but .* has 3 labels"):
        load_fashion_mnist(tmp_path, "test")


@needs_fashion_mnist
def test_fashion_mnist_files_and_subsets():
    images, labels = load_fashion_mnist("/usr/share/datasets/fashion-mnist", "test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and set(labels.tolist()) == set(range(10))
    a = build_data("fashion-mnist", train_subset=300, eval_subset=100, seed=5)
    b = build_data("fashion-mnist", train_subset=300, eval_subset=100, seed=5)
    assert len(a.train) == 300 and len(a.eval) == 100 and a.in_chans == 1 and a.img_size == 28
    assert a.train.indices == b.train.indices  # deterministic from the seed
    x, _ = a.eval[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    full = torch.stack([a.eval[i][0] for i in range(len(a.eval))])
    assert -1.5 < full.mean().item() < 1.5  # normalised


def test_epoch_sampler_order_depends_on_seed_and_epoch_only():
    s = EpochSampler(50, seed=1, epoch=2)
    assert list(s) == list(EpochSampler(50, seed=1, epoch=2))
    assert list(s) != list(EpochSampler(50, seed=1, epoch=3))
    assert sorted(s) == list(range(50))
    assert list(EpochSampler(50, seed=1, epoch=2, skip=20)) == list(s)[20:]
    r0, r1 = EpochSampler(51, 1, 0, rank=0, num_replicas=2), EpochSampler(51, 1, 0, rank=1, num_replicas=2)
    assert len(r0) == len(r1) == 25 and not set(r0) & set(r1)
