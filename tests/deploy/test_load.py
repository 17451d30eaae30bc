"""`load_model` reads every checkpoint kind the zoo loads: official .pth, safetensors, `agentattn train`."""

from __future__ import annotations

import pytest
import timm
import torch

from agentattn.deploy import load_model
from agentattn.deploy.export import check_runs
from agentattn.io import save_safetensors

from .conftest import FMNIST_KWARGS, FMNIST_MODEL, OFFICIAL_DEIT, REDUCED


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_official_pth_like_the_zoo_loads_it():
    kwargs, _, path = REDUCED["agent_deit_tiny_patch16_224"]
    model, spec = load_model("agent_deit_tiny_patch16_224", path, model_kwargs=kwargs)
    zoo = timm.create_model(
        "agent_deit_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        num_classes=100,
        **kwargs,
    )
    _same_state(model, zoo)
    assert (spec.num_classes, spec.in_chans, spec.img_size, spec.checkpoint) == (100, 3, 224, str(path))
    assert not model.training


def test_safetensors_of_a_zoo_and_of_a_timm_model(tmp_path):
    for name, kwargs in [
        ("agent_swin_tiny_224", dict(depths=(1, 1, 1, 1))),
        ("deit_tiny_patch16_224", dict(depth=1)),
    ]:
        source = timm.create_model(name, num_classes=7, img_size=64, **kwargs)
        path = tmp_path / f"{name}.safetensors"
        save_safetensors(source.state_dict(), path)
        model, spec = load_model(name, path, img_size=64, model_kwargs=kwargs)
        _same_state(model, source)
        assert spec.num_classes == 7  # from the file's head.weight


def test_train_checkpoint_records_everything(fmnist_checkpoint):
    model, spec = load_model(FMNIST_MODEL, fmnist_checkpoint)
    assert (spec.num_classes, spec.in_chans, spec.img_size, spec.data) == (10, 1, 28, "fashion-mnist")
    assert {k: spec.model_kwargs.get(k) for k in FMNIST_KWARGS} == FMNIST_KWARGS
    check_runs(model, spec)
    # Another export resolution: the model is built at the training size (weights fit) and runs at 32².
    _, spec32 = load_model(FMNIST_MODEL, fmnist_checkpoint, img_size=32)
    assert spec32.img_size == 32
    check_runs(model, spec32)
    with pytest.raises(ValueError, match="trained for 10 classes / 1 channels"):
        load_model(FMNIST_MODEL, fmnist_checkpoint, num_classes=5)


def test_ema_request_without_ema_weights(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_safetensors(timm.create_model("deit_tiny_patch16_224", depth=1, img_size=32).state_dict(), path)
    model, _ = load_model(
        "deit_tiny_patch16_224", path, img_size=32, model_kwargs=dict(depth=1), use_ema=True
    )
    assert model is not None  # a safetensors file holds one state dict: use_ema is ignored (as in the zoo)
    official = OFFICIAL_DEIT / "checkpoint.pth"
    with pytest.raises(ValueError, match="no EMA weights"):
        load_model(
            "agent_deit_tiny_patch16_224",
            official,
            model_kwargs=REDUCED["agent_deit_tiny_patch16_224"][0],
            use_ema=True,
        )
