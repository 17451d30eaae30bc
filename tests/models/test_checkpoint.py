"""The safe checkpoint loader, load_pretrained, agent-bias resizing and ``agentattn convert``."""

from __future__ import annotations

import argparse
import builtins
import collections
import logging
import os
import pickle
import sys
import types
import zipfile

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from agentattn.cli import convert
from agentattn.io import (
    PickledObject,
    UnsafeCheckpointError,
    load_checkpoint,
    safe_torch_load,
    save_safetensors,
)
from agentattn.layers import AgentAttention
from agentattn.models.pretrained import load_pretrained, resize_agent_bias_tables
from tests.conftest import DATA_DIR

FAMILIES = ["deit", "pvt", "swin", "cswin"]


def official_checkpoint(family: str):
    return DATA_DIR / "vectors" / "models" / f"agent_{family}_reduced_a" / "checkpoint.pth"


def trusted_torch_load(path, monkeypatch):
    """torch.load(weights_only=False) of a trusted official file; yacs is not installed, so stub its CfgNode."""
    yacs, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    config.CfgNode = type("CfgNode", (dict,), {"__module__": "yacs.config"})
    yacs.config = config
    monkeypatch.setitem(sys.modules, "yacs", yacs)
    monkeypatch.setitem(sys.modules, "yacs.config", config)
    return torch.load(path, weights_only=False, map_location="cpu")


def assert_same_state(actual: dict, expected: dict, ordered: bool = True) -> None:
    """Same keys (in the same order unless ``ordered=False``: safetensors sorts them), dtypes and values."""
    assert list(actual) == list(expected) if ordered else sorted(actual) == sorted(expected)
    for key, ref in expected.items():
        got = actual[key]
        assert type(got) is torch.Tensor, key
        assert got.dtype == ref.dtype and got.shape == ref.shape, key
        assert torch.equal(got, ref), key


def convert_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    return parser.parse_args(list(argv))


# --- official files --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_official_checkpoints_load_exactly(family, monkeypatch):
    path = official_checkpoint(family)
    expected = trusted_torch_load(path, monkeypatch)["model"]
    assert_same_state(load_checkpoint(path), dict(expected))


def test_official_config_becomes_placeholder():
    obj = safe_torch_load(official_checkpoint("swin"))
    assert set(obj) >= {"model", "optimizer", "lr_scheduler", "max_accuracy", "epoch", "config"}
    config = obj["config"]
    assert isinstance(config, PickledObject)
    assert (config.pickled_module, config.pickled_name) == ("yacs.config", "CfgNode")
    assert isinstance(config.MODEL, PickledObject) and isinstance(config.MODEL.TYPE, str)  # items kept
    assert isinstance(config.pickled_state, dict)  # BUILD state kept, not applied
    assert "yacs" not in sys.modules or not hasattr(sys.modules["yacs"], "__file__")
    assert isinstance(obj["epoch"], int) and isinstance(obj["max_accuracy"], float)


@pytest.mark.parametrize("family", ["deit", "cswin"])
def test_convert_roundtrip(family, tmp_path, capsys):
    src = official_checkpoint(family)
    out = tmp_path / "weights.safetensors"
    assert convert.run(convert_args(str(src), str(out))) == 0
    assert "wrote" in capsys.readouterr().out
    assert_same_state(load_checkpoint(out), load_checkpoint(src), ordered=False)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["source"] == "checkpoint.pth" and meta["format"] == "pt"


# --- malicious pickles -----------------------------------------------------------------------------------------


class _SystemCall:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _ExecCall:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class _OpenCall:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.fixture(params=["system", "exec", "open"])
def malicious_checkpoint(request, tmp_path):
    marker = tmp_path / "PWNED"
    payload = {
        "system": _SystemCall(f"touch {marker}"),
        "exec": _ExecCall(str(marker)),
        "open": _OpenCall(str(marker)),
    }[request.param]
    path = tmp_path / "evil.pth"
    torch.save({"model": {"weight": torch.ones(4, 3)}, "epoch": 1, "config": payload}, path)
    assert not marker.exists()
    return path, marker, request.param


def test_malicious_refused_by_load_checkpoint(malicious_checkpoint):
    path, marker, kind = malicious_checkpoint
    with pytest.raises(UnsafeCheckpointError, match=kind):
        load_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(ValueError):  # UnsafeCheckpointError is a ValueError
        safe_torch_load(path)
    assert not marker.exists()


def test_malicious_refused_by_load_pretrained(malicious_checkpoint):
    path, marker, _ = malicious_checkpoint
    model = nn.Linear(3, 4, bias=False)
    before = model.weight.detach().clone()
    with pytest.raises(UnsafeCheckpointError):
        load_pretrained(model, path)
    assert not marker.exists()
    assert torch.equal(model.weight, before)


def test_malicious_refused_by_convert(malicious_checkpoint, tmp_path, capsys):
    path, marker, _ = malicious_checkpoint
    out = tmp_path / "out.safetensors"
    assert convert.run(convert_args(str(path), str(out))) == 1
    assert "not allow" in capsys.readouterr().err
    assert not marker.exists() and not out.exists()


def test_unknown_class_module_is_never_imported(tmp_path, monkeypatch):
    """A class from a module whose import has side effects becomes a placeholder; the module is not imported."""
    marker = tmp_path / "IMPORTED"
    name = "agentattn_test_evil_module"
    fake = types.ModuleType(name)

    class Thing(dict):
        pass

    Thing.__module__, Thing.__qualname__ = name, "Thing"
    fake.Thing = Thing
    monkeypatch.setitem(sys.modules, name, fake)
    thing = Thing(alpha=1, beta=[1, 2])
    thing.flag = "x"
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "thing": thing}, path)
    monkeypatch.delitem(sys.modules, name)
    (tmp_path / f"{name}.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\nclass Thing(dict):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    obj = safe_torch_load(path)
    loaded = obj["thing"]
    assert isinstance(loaded, PickledObject) and not isinstance(loaded, Thing)
    assert dict(loaded) == {"alpha": 1, "beta": [1, 2]}
    assert loaded.alpha == 1 and loaded.pickled_state == {"flag": "x"}
    assert name not in sys.modules and not marker.exists()
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(3.0))


def test_calling_a_placeholder_class_is_refused(tmp_path, monkeypatch):
    name = "agentattn_test_other_module"
    fake = types.ModuleType(name)

    class Factory:
        def __reduce__(self):
            return (Maker, ("arg",))

    class Maker:
        pass

    Maker.__module__, Maker.__qualname__ = name, "Maker"
    fake.Maker = Maker
    monkeypatch.setitem(sys.modules, name, fake)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"w": torch.ones(1)}, "x": Factory()}, path)
    with pytest.raises(UnsafeCheckpointError, match=f"{name}.Maker"):
        load_checkpoint(path)


# --- unwrapping and formats ------------------------------------------------------------------------------------


def test_bare_state_dict_parameters_and_module_prefix(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    state = model.state_dict(keep_vars=True)  # Parameters, not plain tensors
    path = tmp_path / "bare.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    loaded = load_checkpoint(path)
    assert_same_state(loaded, {k: v.detach() for k, v in state.items()})
    assert not any(t.requires_grad for t in loaded.values())


def test_use_ema(tmp_path):
    model_sd = {"w": torch.zeros(2, 2)}
    ema_sd = {"w": torch.ones(2, 2)}
    path = tmp_path / "train.pth"
    torch.save({"model": model_sd, "state_dict_ema": ema_sd, "optimizer": {}, "epoch": 3}, path)
    assert torch.equal(load_checkpoint(path)["w"], model_sd["w"])
    assert torch.equal(load_checkpoint(path, use_ema=True)["w"], ema_sd["w"])

    deit_style = tmp_path / "deit.pth"
    torch.save({"model": model_sd, "model_ema": ema_sd}, deit_style)
    assert torch.equal(load_checkpoint(deit_style, use_ema=True)["w"], ema_sd["w"])

    no_ema = tmp_path / "no_ema.pth"
    torch.save({"model": model_sd, "epoch": 3}, no_ema)
    with pytest.raises(ValueError, match=r"no EMA weights.*'model'.*'epoch'"):
        load_checkpoint(no_ema, use_ema=True)

    out = tmp_path / "ema.safetensors"
    assert convert.run(convert_args(str(path), str(out), "--ema")) == 0
    assert torch.equal(load_checkpoint(out)["w"], ema_sd["w"])


def test_dtypes_views_and_legacy_format(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "f32": base,
        "view": base[1:, ::2],  # non-contiguous view sharing storage with f32
        "t": base.t(),
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f16": torch.randn(7).half(),
        "i64": torch.arange(5),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
    }
    for zipped in (True, False):
        path = tmp_path / f"s_{zipped}.pth"
        torch.save({"state_dict": state}, path, _use_new_zipfile_serialization=zipped)
        loaded = load_checkpoint(path)
        assert_same_state(loaded, state)
        assert loaded["view"].stride() == state["view"].stride()
        assert loaded["view"].untyped_storage().data_ptr() == loaded["f32"].untyped_storage().data_ptr()

    path = tmp_path / "f8.pth"
    f8 = torch.randn(6).to(torch.float8_e4m3fn)
    torch.save({"x": f8}, path)  # new dtypes use _rebuild_tensor_v3 with an UntypedStorage
    assert torch.equal(load_checkpoint(path)["x"].view(torch.uint8), f8.view(torch.uint8))


def test_save_safetensors_shared_storage(tmp_path):
    weight = torch.randn(4, 4)
    state = {"a": weight, "b": weight, "c": weight[:, 1]}  # tied and a non-contiguous view
    path = tmp_path / "tied.safetensors"
    save_safetensors(state, path, metadata={"note": "x"})
    assert_same_state(load_checkpoint(path), {k: v.contiguous() for k, v in state.items()}, ordered=False)
    with pytest.raises(ValueError, match="not a tensor"):
        save_safetensors({"a": 1}, tmp_path / "bad.safetensors")


# --- broken files ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_files(tmp_path, keep):
    data = official_checkpoint("deit").read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=r"truncated\.pth"):
        load_checkpoint(path)

    out = tmp_path / "good.safetensors"
    save_safetensors({"w": torch.randn(64, 64)}, out)
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(out.read_bytes()[: int(out.stat().st_size * keep)])
    with pytest.raises(ValueError, match=r"truncated\.safetensors"):
        load_checkpoint(bad)


def test_corrupted_and_non_checkpoint_files(tmp_path, capsys):
    data = bytearray(official_checkpoint("deit").read_bytes())
    start = data.index(b"data.pkl") + 40
    data[start : start + 200] = b"\xff" * 200  # garbage inside the pickle
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"corrupt\.pth"):
        load_checkpoint(corrupt)

    text = tmp_path / "notes.pth"
    text.write_text("hello, not a checkpoint\n")
    with pytest.raises(ValueError, match=r"notes\.pth"):
        load_checkpoint(text)

    listing = tmp_path / "list.pth"
    torch.save([1, 2, 3], listing)
    with pytest.raises(ValueError, match=r"list\.pth"):
        load_checkpoint(listing)

    no_weights = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "state_dict_ema": {"w": torch.ones(1)}}, no_weights)
    with pytest.raises(ValueError, match="use_ema=True"):
        load_checkpoint(no_weights)

    plain_pickle = tmp_path / "plain.pkl"
    plain_pickle.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(ValueError, match=r"plain\.pkl"):
        load_checkpoint(plain_pickle)

    with pytest.raises(ValueError, match=r"missing\.pth"):
        load_checkpoint(tmp_path / "missing.pth")
    assert convert.run(convert_args(str(text), str(tmp_path / "o.safetensors"))) == 1
    assert "notes.pth" in capsys.readouterr().err


# --- resizing and load_pretrained ------------------------------------------------------------------------------


class Toy(nn.Module):
    def __init__(self, grid: int, num_classes: int = 10, dim: int = 8) -> None:
        super().__init__()
        self.attn = AgentAttention(dim, num_heads=2, agent_num=4, grid_size=grid, num_prefix_tokens=1)
        self.head = nn.Linear(dim, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x).mean(1))


def official_resize(key: str, value: torch.Tensor, size: int) -> torch.Tensor:
    """The official fine-tuning loader's formula: squeeze to (h, n, L), 1-D linear interpolation, reshape."""
    _, h = value.shape[:2]
    if key.endswith(("ah_bias", "aw_bias")):
        n = value.shape[2]
        out = F.interpolate(value.reshape(h, n, -1), size=size, mode="linear", align_corners=False)
        return out.reshape(1, h, n, size, 1) if key.endswith("ah_bias") else out.reshape(1, h, n, 1, size)
    n = value.shape[-1]
    seq = value.reshape(h, -1, n).permute(0, 2, 1)  # (h, n, L)
    out = F.interpolate(seq, size=size, mode="linear", align_corners=False).permute(0, 2, 1)
    return out.reshape(1, h, size, 1, n) if key.endswith("ha_bias") else out.reshape(1, h, 1, size, n)


def test_resize_agent_bias_tables():
    source, target = Toy(grid=14), Toy(grid=7)
    state = source.state_dict()
    resized = resize_agent_bias_tables(state, target)
    names = ("ah_bias", "aw_bias", "ha_bias", "wa_bias")
    for key, value in resized.items():
        assert value.shape == target.state_dict()[key].shape, key
        if key.endswith(names):
            torch.testing.assert_close(value, official_resize(key, state[key], 7), rtol=0, atol=1e-7)
        else:
            assert value is state[key], key  # everything else passes through
    # 14 -> 7 with align_corners=False samples x = 2i + 0.5: the mean of each pair.
    ramp = torch.arange(14.0).reshape(1, 1, 1, 14, 1).expand(1, 2, 4, 14, 1).contiguous()
    out = resize_agent_bias_tables({"attn.ah_bias": ramp}, target)["attn.ah_bias"]
    assert torch.equal(out[0, 1, 3, :, 0], torch.arange(7.0) * 2 + 0.5)
    # Same size: identity.
    same = resize_agent_bias_tables(state, Toy(grid=14))
    assert all(same[k] is state[k] for k in state)


def test_load_pretrained_resizes_and_runs(tmp_path):
    source = Toy(grid=14)
    path = tmp_path / "toy.pth"
    torch.save({"model": source.state_dict(), "config": {"x": 1}}, path)
    target = Toy(grid=7)
    load_pretrained(target, path, filter_fn=resize_agent_bias_tables)
    assert torch.equal(target.attn.qkv.weight, source.attn.qkv.weight)
    expected = official_resize("attn.ha_bias", source.attn.ha_bias.detach(), 7)
    torch.testing.assert_close(target.attn.ha_bias.detach(), expected, rtol=0, atol=1e-7)
    assert target(torch.randn(2, 1 + 49, 8)).shape == (2, 10)


def test_load_pretrained_head_mismatch_keeps_fresh_head(tmp_path, caplog):
    source = Toy(grid=7, num_classes=10)
    path = tmp_path / "toy.safetensors"
    save_safetensors(source.state_dict(), path)
    target = Toy(grid=7, num_classes=5)
    fresh = target.head.weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        load_pretrained(target, path)
    assert torch.equal(target.head.weight, fresh)
    assert torch.equal(target.attn.proj.weight, source.attn.proj.weight)
    assert "head.weight" in caplog.text and "re-initialised" in caplog.text


def test_load_pretrained_reports_mismatches(tmp_path, caplog):
    state = Toy(grid=7).state_dict()
    del state["attn.proj.bias"]
    state["attn.extra"] = torch.ones(1)
    state["attn.ah_bias"] = torch.zeros(1, 2, 9, 7, 1)  # agents differ: not resizable
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    target = Toy(grid=7)
    with pytest.raises(ValueError) as info:
        load_pretrained(target, path, filter_fn=resize_agent_bias_tables)
    message = str(info.value)
    for part in ("missing (1): attn.proj.bias", "unexpected (1): attn.extra", "mis-shaped (1): attn.ah_bias"):
        assert part in message
    before = target.attn.ah_bias.detach().clone()
    with caplog.at_level(logging.WARNING):
        load_pretrained(target, path, filter_fn=resize_agent_bias_tables, strict=False)
    assert torch.equal(target.attn.qkv.weight, state["attn.qkv.weight"])
    assert torch.equal(target.attn.ah_bias, before)


def test_ordered_dict_metadata_kept():
    obj = safe_torch_load(official_checkpoint("deit"))
    assert isinstance(obj["model"], collections.OrderedDict)
    assert obj["model"]._metadata[""] == {"version": 1}


def test_big_endian_zip(tmp_path):
    """A file written on a big-endian machine (byteorder 'big', element bytes reversed) loads the same values."""
    state = {"f32": torch.randn(3, 4), "i64": torch.arange(6), "c64": torch.randn(3, dtype=torch.complex64)}
    little = tmp_path / "little.pth"
    torch.save(state, little)
    big = tmp_path / "big.pth"
    sizes = {"0": 4, "1": 8, "2": 4}  # storage key -> byte unit (complex: each half)
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                unit = sizes[info.filename.rsplit("/", 1)[-1]]
                data = b"".join(data[i : i + unit][::-1] for i in range(0, len(data), unit))
            dst.writestr(info, data)
    assert_same_state(load_checkpoint(big), state)


def test_whole_module_pickle_is_not_a_state_dict(tmp_path):
    path = tmp_path / "module.pth"
    torch.save(nn.Sequential(nn.Linear(2, 3)), path)
    with pytest.raises(ValueError, match=r"pickled torch\.nn\.modules\.container\.Sequential"):
        load_checkpoint(path)
