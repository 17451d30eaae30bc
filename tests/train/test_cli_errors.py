"""Bad input: one line naming the path or name at fault and what to do, exit code 1, no traceback."""

from __future__ import annotations

import subprocess

import pytest
import torch
from safetensors.torch import save_file

from agentattn.cli import eval as eval_cli
from agentattn.cli import train as train_cli
from agentattn.train import TrainConfig, train

from . import PYTHON, TINY_CLI, TINY_KWARGS, TINY_MODEL, needs_fashion_mnist, subprocess_env


def _one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"agentattn {prog}: error: ") and "Traceback" not in err
    return err


def test_missing_dataset(tmp_path, capsys):
    code = train_cli.main([*TINY_CLI, "--data", f"fashion-mnist:{tmp_path}", "--output", str(tmp_path / "o")])
    assert code == 1
    err = _one_error_line(capsys, "train")
    assert (
        str(tmp_path / "train-images-idx3-ubyte.gz") in err and "apt-get install dataset-fashion-mnist" in err
    )


def test_missing_image_folder(tmp_path, capsys):
    assert (
        train_cli.main(["--data", f"imagefolder:{tmp_path / 'nope'}", "--output", str(tmp_path / "o")]) == 1
    )
    assert str(tmp_path / "nope" / "val") in _one_error_line(capsys, "train")


@needs_fashion_mnist
def test_unknown_model(tmp_path, capsys):
    args = ["--model", "agent_pvt_nonexistent", "--train-subset", "64", "--output", str(tmp_path / "o")]
    assert train_cli.main(args) == 1
    err = _one_error_line(capsys, "train")
    assert "'agent_pvt_nonexistent'" in err and "timm.list_models" in err


@needs_fashion_mnist
def test_bad_model_kwargs(tmp_path, capsys):
    args = [
        "--model-kwargs",
        "no_such_option=3",
        "--train-subset",
        "64",
        "--batch-size",
        "32",
        "--output",
        str(tmp_path / "o"),
    ]
    assert train_cli.main(args) == 1
    assert "no_such_option" in _one_error_line(capsys, "train")


def test_unreadable_checkpoint(tmp_path, capsys):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    assert eval_cli.main(["--checkpoint", str(bad)]) == 1
    assert str(bad) in _one_error_line(capsys, "eval")
    assert eval_cli.main(["--checkpoint", str(tmp_path / "missing.pth")]) == 1
    assert "missing.pth: no such checkpoint file" in _one_error_line(capsys, "eval")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(
        model=TINY_MODEL, model_kwargs=TINY_KWARGS, output=str(out), batch_size=32, train_subset=64,
        eval_subset=64, threads=2, progress=False,
    )  # fmt: skip
    train(config)
    return out


@needs_fashion_mnist
def test_checkpoint_from_another_architecture(trained, tmp_path, capsys):
    ckpt = trained / "last.pth"
    assert eval_cli.main(["--checkpoint", str(ckpt), "--model", "agent_deit_tiny_patch16_224"]) == 1
    err = _one_error_line(capsys, "eval")
    assert str(ckpt) in err and "'agent_pvt_tiny_224'" in err and "drop --model" in err
    # A bare state dict of the tiny PVT given to a full-size one.
    weights = tmp_path / "tiny.safetensors"
    save_file(torch.load(ckpt, weights_only=True)["model"], str(weights))
    assert eval_cli.main(["--checkpoint", str(weights), "--model", TINY_MODEL, "--subset", "32"]) == 1
    err = _one_error_line(capsys, "eval")
    assert str(weights) in err and "another architecture" in err and "model_name" in err


@needs_fashion_mnist
def test_existing_run_needs_resume(trained, capsys):
    assert train_cli.main([*TINY_CLI, "--train-subset", "64", "--output", str(trained)]) == 1
    err = _one_error_line(capsys, "train")
    assert (
        "last.pth exists: set resume" in err and "another output directory" in err and "set overwrite" in err
    )


def test_no_traceback_from_the_command_line(tmp_path):
    # The real entry point, in a fresh process: stderr is exactly one line.
    cmd = [PYTHON, "-m", "agentattn.cli.eval", "--checkpoint", str(tmp_path / "none.pth")]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert str(tmp_path / "none.pth") in proc.stderr


@needs_fashion_mnist
def test_resume_with_other_settings(trained, capsys):
    args = [*TINY_CLI, "--train-subset", "64", "--batch-size", "16", "--output", str(trained), "--resume"]
    assert train_cli.main(args) == 1
    err = _one_error_line(capsys, "train")
    assert str(trained / "last.pth") in err and "batch_size: 32 -> 16" in err
