"""What a checkpoint may say about its model: registry names, architecture kwargs only, bounded values, and a
model no larger than the file's weights."""

from __future__ import annotations

import pytest
import timm
import torch

from agentattn.models.record import (
    FORBIDDEN_KWARGS,
    allowed_model_kwargs,
    check_json_like,
    check_model_fits_weights,
    checked_model_kwargs,
    read_model_record,
)
from agentattn.train.restore import model_from_checkpoint, read_checkpoint

TINY = dict(depth=1, patch_size=8, embed_dim=16, num_heads=2, agent_num=4)


@pytest.mark.parametrize("name", timm.list_models("agent_*"))
def test_every_zoo_model_allows_its_architecture_kwargs_and_no_source(name):
    allowed = allowed_model_kwargs(name)
    assert {"agent_num", "attn_type", "drop_path_rate", "img_size", "num_classes", "in_chans"} <= allowed
    assert not allowed & FORBIDDEN_KWARGS
    assert not any("pretrained" in k or k.endswith("path") for k in allowed)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pretrained": True}, "never taken from a file"),
        ({"pretrained_cfg_overlay": {"url": "file:///etc/passwd"}}, "never taken from a file"),
        ({"checkpoint_path": "/x"}, "never taken from a file"),
        ({"embed_dim": 16, "made_up": 1}, "not architecture arguments"),
        ({"embed_dim": 10**9}, "out of range"),
        ({"drop_rate": float("inf")}, "not finite"),
        ({"attn_type": "A" * 1000}, "characters"),
        ([1], "not a dict"),
    ],
)
def test_bad_model_kwargs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        checked_model_kwargs("agent_deit_tiny_patch16_224", kwargs, "f.pth")


def test_json_walk_stops_at_its_bounds():
    value = [0]
    for _ in range(60):
        value = [value, value]  # 2**60 leaves by reference
    with pytest.raises(ValueError, match=r"deeper|more than"):
        check_json_like(value, "x")
    check_json_like({"a": [1, 2.5, "s", None, True, {"b": (1, 2)}]}, "x")


def test_record_fields_are_checked():
    good = {"model_name": "agent_deit_tiny_patch16_224", "model_kwargs": dict(TINY), "num_classes": 10,
            "in_chans": 1, "img_size": 32}  # fmt: skip
    assert read_model_record(good, "f")["model_kwargs"] == TINY
    for key, value, match in [("model_name", 3, "not a model name"), ("model_name", "nope", "not a registered"),
                              ("num_classes", "10", "not an int"), ("img_size", 10**7, "not an int")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            read_model_record({**good, key: value}, "f")


def test_a_model_larger_than_the_weights_is_refused_before_it_is_built():
    small = {"w": torch.zeros(10)}
    with pytest.raises(ValueError, match=r"holds .* bytes, but the file has 40 bytes"):
        check_model_fits_weights(lambda: timm.create_model("agent_deit_tiny_patch16_224"), small, "f")
    state = timm.create_model("agent_deit_tiny_patch16_224", **TINY).state_dict()
    check_model_fits_weights(lambda: timm.create_model("agent_deit_tiny_patch16_224", **TINY), state, "f")


def test_a_run_directory_reads_as_its_last_pth(tmp_path):
    model = timm.create_model("agent_deit_tiny_patch16_224", num_classes=3, in_chans=1, img_size=32, **TINY)
    record = {"format": "agentattn-train-v1", "model_name": "agent_deit_tiny_patch16_224", "model_kwargs": TINY,
              "num_classes": 3, "in_chans": 1, "img_size": 32, "class_names": ["a", "b", "c"],
              "config": {"data": "fashion-mnist:/somewhere"}, "model": model.state_dict()}  # fmt: skip
    (tmp_path / "run").mkdir()
    torch.save(record, tmp_path / "run" / "last.pth")
    state, meta = read_checkpoint(tmp_path / "run")
    assert meta["data"] == "fashion-mnist" and meta["class_names"] == ["a", "b", "c"]
    assert "config" not in meta and set(state) == set(model.state_dict())
    rebuilt, _ = model_from_checkpoint(tmp_path / "run" / "last.pth")
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(rebuilt(x), model.eval()(x))
