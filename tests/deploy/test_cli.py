"""`agentattn export` and `agentattn bench deploy`: a checked export from a training checkpoint, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from agentattn.bench import deploy as bench_deploy
from agentattn.cli import export as export_cli
from agentattn.cli.main import main

from .conftest import FMNIST_MODEL, needs_exporter
from .test_export import check_graph


def _export(args: list[str]) -> int:
    return main(["export", *args])


def test_int8_export_from_a_train_checkpoint_with_eval(fmnist_checkpoint, tmp_path, capsys):
    """The Fashion-MNIST (`make run`) architecture: fp32 ONNX parity at batch 1 and 3, int8, accuracy."""
    needs_exporter()
    out, report = tmp_path / "fmnist.int8.onnx", tmp_path / "report.json"
    args = [
        "--checkpoint",
        str(fmnist_checkpoint),
        "--format",
        "onnx",
        "--dynamic-batch",
        "--quantize",
        "int8",
    ]
    args += ["--eval", "--eval-subset", "64", "--threads", "2", "--json", str(report)]
    assert _export([FMNIST_MODEL, str(out), *args]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "max |Δlogits| vs eager fp32" in printed and "onnxruntime int8" in printed
    result = json.loads(report.read_text())
    assert result["img_size"] == 28 and set(result["max_abs_diff"]) == {"1", "3"}
    assert all(d <= 0.1 for d in result["max_abs_diff_fp32"].values())  # the fp32 graph before quantising
    assert max(result["max_abs_diff_fp32"].values()) <= 1e-4
    accuracies = result["eval"]["results"]
    assert set(accuracies) == {"eager fp32", "onnxruntime fp32", "onnxruntime int8"}
    assert all(r["images"] == 64 for r in accuracies.values())
    assert accuracies["eager fp32"]["top1"] == pytest.approx(accuracies["onnxruntime fp32"]["top1"], abs=1.6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fmnist.int8.onnx", "report.json"]  # no temp files
    check_graph(out)  # the Agent-PVT graph: no gathers, scatters, bias interpolation or custom ops


def test_eval_of_a_fixed_batch_graph(fmnist_checkpoint, tmp_path, capsys):
    """Without --dynamic-batch the graph takes one batch size: --eval feeds it slices of that size (it crashed in
    onnxruntime before)."""
    needs_exporter()
    out, report = tmp_path / "fixed.onnx", tmp_path / "report.json"
    args = ["--checkpoint", str(fmnist_checkpoint), "--format", "onnx", "--batch-size", "4", "--eval",
            "--eval-subset", "10", "--eval-batch-size", "8", "--threads", "2", "--json", str(report)]  # fmt: skip
    assert _export([FMNIST_MODEL, str(out), *args]) == 0, capsys.readouterr().err
    accuracies = json.loads(report.read_text())["eval"]["results"]
    assert set(accuracies) == {"eager fp32", "onnxruntime fp32"}
    assert all(r["images"] == 10 for r in accuracies.values())
    assert accuracies["eager fp32"]["top1"] == pytest.approx(accuracies["onnxruntime fp32"]["top1"], abs=10.1)


def test_a_file_name_that_does_not_match_the_format_is_warned_about(fmnist_checkpoint, tmp_path, capsys):
    needs_exporter()
    out = tmp_path / "model.txt"
    args = ["--checkpoint", str(fmnist_checkpoint), "--format", "onnx", "--batch-size", "2", "--threads", "2"]
    assert _export([FMNIST_MODEL, str(out), *args]) == 0
    err = capsys.readouterr().err
    assert f"{out} does not end in .onnx" in err and out.stat().st_size > 0


def test_unknown_model_name(tmp_path, capsys):
    assert _export(["agent_nonexistent", str(tmp_path / "m.onnx"), "--format", "onnx"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("agentattn export: error: unknown model 'agent_nonexistent'") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04 truncated zip"])
def test_unreadable_checkpoint(tmp_path, capsys, content):
    ckpt = tmp_path / "broken.pth"
    ckpt.write_bytes(content)
    out = tmp_path / "m.onnx"
    assert _export([FMNIST_MODEL, str(out), "--format", "onnx", "--checkpoint", str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert "broken.pth" in err and err.count("\n") == 1
    assert not out.exists()


def test_missing_checkpoint_and_checkpoint_of_another_model(fmnist_checkpoint, tmp_path, capsys):
    out = tmp_path / "m.pt2"
    assert _export([FMNIST_MODEL, str(out), "--format", "torch-export", "--checkpoint", "nope.pth"]) == 1
    assert "nope.pth: no such checkpoint file" in capsys.readouterr().err
    args = ["agent_deit_tiny_patch16_224", str(out), "--format", "torch-export", "--checkpoint"]
    assert _export([*args, str(fmnist_checkpoint)]) == 1
    assert f"checkpoint of {FMNIST_MODEL!r}, not 'agent_deit_tiny_patch16_224'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("name", "size", "message"),
    [
        ("agent_deit_tiny_patch16_224", "0", "img_size must be a positive int"),
        ("agent_deit_tiny_patch16_224", "8", "img_size 8 does not work for agent_deit_tiny_patch16_224"),
        ("agent_pvt_tiny_224", "-3", "img_size must be a positive int"),
    ],
)
def test_impossible_image_size(tmp_path, capsys, name, size, message):
    out = tmp_path / "m.onnx"
    args = [name, str(out), "--format", "onnx", "--img-size", size, "--model-kwargs", "depths=(1,1,1,1)"]
    if name.startswith("agent_deit"):
        args[-1] = "depth=1"
    assert _export(args) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_option_combinations(tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    assert (
        _export(["agent_deit_tiny_patch16_224", out, "--format", "torch-export", "--quantize", "int8"]) == 1
    )
    assert "--quantize int8 needs --format onnx" in capsys.readouterr().err
    assert _export(["agent_deit_tiny_patch16_224", out, "--format", "onnx", "--quantize", "bf16"]) == 1
    assert "--quantize bf16 needs --format torch-export" in capsys.readouterr().err
    assert _export(["agent_deit_tiny_patch16_224", str(tmp_path / "no" / "m.onnx"), "--format", "onnx"]) == 1
    assert "existing directory" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_failed_export_leaves_no_partial_file(tmp_path, capsys, monkeypatch, fmt):
    """The writer dies half-way: OUT keeps its old content and no temp file is left beside it."""

    def dies_half_way(*args, **kwargs):
        path = next(a for a in (*args, *kwargs.values()) if hasattr(a, "write_bytes"))
        path.write_bytes(b"half a model")
        raise RuntimeError("disk on fire")

    class FakeOnnxProgram:
        save = staticmethod(lambda path, **kwargs: dies_half_way(path))

    monkeypatch.setattr(export_cli, "export_program", lambda *args, **kwargs: object())
    monkeypatch.setattr(torch.export, "save", lambda program, path: dies_half_way(path))
    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: FakeOnnxProgram())
    out = tmp_path / "m.out"
    out.write_bytes(b"previous export")
    args = ["agent_deit_tiny_patch16_224", str(out), "--format", fmt, "--model-kwargs", "depth=1"]
    assert _export(args) == 1
    err = capsys.readouterr().err
    assert "exporting agent_deit_tiny_patch16_224 failed (RuntimeError: disk on fire)" in err
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.out"]


def test_bench_deploy_table(tmp_path):
    """One small model through eager and onnxruntime fp32/int8 (compile is left to the real run)."""
    needs_exporter()
    result = bench_deploy.bench_model(
        "agent_deit_tiny_patch16_224",
        [1, 2],
        ["eager", "ort-fp32", "ort-int8"],
        tmp_path,
        32,
        2,
        0.05,
        kwargs=dict(depth=1),
    )
    assert not result.errors, result.errors
    assert set(result.img_per_s) == {"eager", "ort-fp32", "ort-int8"}
    assert all(v > 0 for per_batch in result.img_per_s.values() for v in per_batch.values())
    assert max(result.max_abs_diff.values()) <= 1e-4
    table = bench_deploy.format_table([result], [1, 2], ["eager", "ort-fp32", "ort-int8"])
    assert table.count("\n") == 3 and "agent_deit_tiny_patch16_224" in table
