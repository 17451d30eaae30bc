"""Shared exports: each model is exported once per session (an export takes seconds) and reused by the tests.

The four agent families run at reduced depth and small images (the export time grows with the number of
blocks, not with the image size); the acceptance run (`agentattn bench deploy`) checks the full tiny models.
The Fashion-MNIST architecture of `make run` is exported from a checkpoint written by `agentattn train` with a
tiny budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from agentattn.report.compare import COMPARE_MODEL, COMPARE_MODEL_KWARGS
from agentattn.train import TrainConfig, train
from agentattn.train.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    DataBundle,
    FashionMNIST,
    load_fashion_mnist,
)
from tests.conftest import DATA_DIR
from tests.train import needs_fashion_mnist

# The `make run` model (`agentattn compare`'s agent twin): a 4-stage Agent-PVT for 28² Fashion-MNIST images.
FMNIST_MODEL = COMPARE_MODEL
FMNIST_KWARGS = dict(COMPARE_MODEL_KWARGS)

# The official reduced Agent-DeiT checkpoint (official code, random init) with its official logits.
OFFICIAL_DEIT = DATA_DIR / "vectors" / "models" / "agent_deit_reduced_a"
# name -> (model kwargs, img size, checkpoint): one block per stage and small images for Swin and CSwin, the
# official reduced checkpoint (2 blocks, 224²) for DeiT.
REDUCED = {
    "agent_deit_tiny_patch16_224": (
        dict(embed_dim=64, depth=2, num_heads=2, agent_num=49),
        None,
        OFFICIAL_DEIT / "checkpoint.pth",
    ),
    "agent_swin_tiny_224": (dict(depths=(1, 1, 1, 1)), 64, None),
    "agent_cswin_tiny_224": (dict(depth=(1, 1, 1, 1)), 64, None),
}


def needs_exporter():
    """Skip (with the reason) when the [deploy] extra is missing."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'agentattn[deploy]'")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed: pip install 'agentattn[deploy]'")


@dataclass
class Exported:
    model: torch.nn.Module
    spec: object
    program: torch.export.ExportedProgram
    onnx: Path


@pytest.fixture(scope="session")
def fmnist_checkpoint(tmp_path_factory) -> Path:
    """An `agentattn train` checkpoint of the `make run` architecture after 2 steps on 64 images."""
    if needs_fashion_mnist.args[0]:  # the skipif condition: the dataset is not installed
        pytest.skip(needs_fashion_mnist.kwargs["reason"])
    out = tmp_path_factory.mktemp("fmnist-run")
    config = TrainConfig(
        model=FMNIST_MODEL,
        model_kwargs=dict(FMNIST_KWARGS),
        output=str(out),
        epochs=1,
        batch_size=32,
        max_steps=2,
        seed=0,
        progress=False,
    )
    # A DataBundle of 96 test images: reading the 60k training images would take longer than the training.
    images, labels = load_fashion_mnist(FASHION_MNIST_DIR, "test")
    data = DataBundle(
        train=FashionMNIST(images[:64], labels[:64]),
        eval=FashionMNIST(images[64:96], labels[64:96]),
        num_classes=10,
        in_chans=1,
        img_size=28,
        class_names=list(FASHION_MNIST_CLASSES),
    )
    train(config, data)
    return out / "last.pth"


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory):
    """name -> :class:`Exported`, filled on first use."""
    return {"dir": tmp_path_factory.mktemp("exports")}


def get_export(cache: dict, name: str, checkpoint: Path | None = None) -> Exported:
    """Export ``name`` (reduced, or from ``checkpoint``) once: program with a dynamic batch, and ONNX."""
    from agentattn.deploy import export_onnx, export_program, load_model
    from agentattn.deploy.export import example_input

    if name not in cache:
        if checkpoint is not None:
            model, spec = load_model(FMNIST_MODEL, checkpoint)
        else:
            kwargs, size, official = REDUCED[name]
            model, spec = load_model(name, official, img_size=size, model_kwargs=kwargs)
        program = export_program(model, example_input(spec), dynamic_batch=True)
        onnx_path = export_onnx(program, cache["dir"] / f"{name}.onnx")
        cache[name] = Exported(model, spec, program, onnx_path)
    return cache[name]
