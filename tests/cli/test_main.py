"""Command-line conventions shared by every command: --version, --output, --model-kwargs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import agentattn
from agentattn.cli.main import build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"agentattn {agentattn.__version__}"


def test_top_level_help_and_version_do_not_import_torch():
    """The console script answers --help / --version without torch or timm (they take seconds to import)."""
    probe = (
        "import sys, contextlib, io, _agentattn_cli\n"
        "for argv in (['--help'], ['--version']):\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "        _agentattn_cli.main(argv)\n"
        "    print(out.getvalue())\n"
        "print('heavy:', sorted(m for m in ('torch', 'timm', 'agentattn') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "heavy: []" in out
    for name, _, _ in __import__("_agentattn_cli").COMMANDS:
        assert f"    {name} " in out  # every command listed
    assert f"agentattn {agentattn.__version__}" in out


def test_command_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["lm", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--d-model D_MODEL (default: 128)" in text and "(default: 16)" in text


@pytest.mark.parametrize("command", [["train", "--attn", "agent"], ["compare"]])
def test_lm_run_directories_take_output_and_the_old_out(command):
    parser = build_parser()
    assert parser.parse_args(["lm", *command, "--output", "runs/x"]).out == "runs/x"
    assert parser.parse_args(["lm", *command, "--out", "runs/y"]).out == "runs/y"


def test_flops_takes_model_kwargs(tmp_path, capsys):
    report = tmp_path / "flops.json"
    args = ["flops", "agent_deit_tiny_patch16_224", "--img-size", "32", "--json", str(report),
            "--model-kwargs", "depth=1", "patch_size=8", "agent_num=4"]  # fmt: skip
    assert main(args) == 0
    (row,) = json.loads(report.read_text())
    assert row["img_size"] == 32 and 0 < row["params"] < 1_000_000  # one block instead of twelve
    assert main(["flops", "agent_deit_tiny_patch16_224", "--model-kwargs", "no_such_kwarg=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "agentattn flops: error: model 'agent_deit_tiny_patch16_224' rejects"
    )
