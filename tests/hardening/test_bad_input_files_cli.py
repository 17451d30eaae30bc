"""Bad input for the checkpoint loaders and every CLI command (table-driven, see cases.py).

CLI cases run ``agentattn ...`` in this process: a failure must be a non-zero exit with one short message naming
the problem (argparse's usage + error counts as short), never a traceback.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from agentattn.io import atomic_torch_save, load_checkpoint, safe_torch_load, save_safetensors
from agentattn.models.pretrained import load_pretrained
from agentattn.train import load_training_checkpoint
from agentattn.train.data import FASHION_MNIST_DIR
from agentattn.train.loop import build_model
from agentattn.train.state import CHECKPOINT_FORMAT
from tests.conftest import DATA_DIR
from tests.train import TINY_CLI, TINY_KWARGS, TINY_MODEL

from .cases import Case, CliFailed, case_id, check_case, run_cli

HAVE_FMNIST = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()
OFFICIAL = {
    f: DATA_DIR / "vectors" / "models" / f"agent_{f}_reduced_a" / "checkpoint.pth" for f in ("deit", "pvt")
}
TINY_DEIT = dict(depth=1, img_size=32, patch_size=8, embed_dim=16, num_heads=2, agent_num=4, num_classes=4)


# -- broken files, made on demand in the test's tmp_path ---------------------------------------------------------


def _official_bytes(family="deit") -> bytes:
    return OFFICIAL[family].read_bytes()


def f_missing(tmp: Path) -> Path:
    return tmp / "missing.pth"


def f_directory(tmp: Path) -> Path:
    (tmp / "adir.pth").mkdir()
    return tmp / "adir.pth"


def f_empty(tmp: Path) -> Path:
    (tmp / "empty.pth").write_bytes(b"")
    return tmp / "empty.pth"


def f_truncated(tmp: Path) -> Path:
    data = _official_bytes()
    (tmp / "truncated.pth").write_bytes(data[: len(data) // 2])
    return tmp / "truncated.pth"


def f_truncated_tail(tmp: Path) -> Path:
    data = _official_bytes()
    (tmp / "tail.pth").write_bytes(data[:-100])
    return tmp / "tail.pth"


def f_corrupted(tmp: Path) -> Path:
    data = bytearray(_official_bytes())
    start = data.index(b"data.pkl") + 40
    data[start : start + 200] = b"\xff" * 200
    (tmp / "corrupt.pth").write_bytes(bytes(data))
    return tmp / "corrupt.pth"


def f_text(tmp: Path) -> Path:
    (tmp / "notes.pth").write_text("not a checkpoint\n")
    return tmp / "notes.pth"


def f_list(tmp: Path) -> Path:
    torch.save([1, 2, 3], tmp / "list.pth")
    return tmp / "list.pth"


def f_truncated_safetensors(tmp: Path) -> Path:
    save_safetensors({"w": torch.randn(32, 32)}, tmp / "good.safetensors")
    data = (tmp / "good.safetensors").read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) // 2])
    return tmp / "cut.safetensors"


def f_bad_header_safetensors(tmp: Path) -> Path:
    (tmp / "hdr.safetensors").write_bytes((20).to_bytes(8, "little") + b'{"w": not json}    ')
    return tmp / "hdr.safetensors"


def f_official(family: str):
    def make(tmp: Path) -> Path:
        shutil.copy(OFFICIAL[family], tmp / f"official_{family}.pth")
        return tmp / f"official_{family}.pth"

    return make


def f_tiny_run(tmp: Path, ema: bool = False) -> Path:
    """A checkpoint as ``agentattn train`` writes it (tiny PVT on Fashion-MNIST), without training."""
    model = build_model(TINY_MODEL, 10, 1, 28, TINY_KWARGS)
    state = {
        "format": CHECKPOINT_FORMAT, "model_name": TINY_MODEL, "model_kwargs": dict(TINY_KWARGS),
        "num_classes": 10, "in_chans": 1, "img_size": 28, "class_names": [str(i) for i in range(10)],
        "config": {"data": "fashion-mnist"}, "model": model.state_dict(),
        "state_dict_ema": model.state_dict() if ema else None, "epoch": 1, "step_in_epoch": 0, "global_step": 1,
    }  # fmt: skip
    path = tmp / "run" / "last.pth"
    path.parent.mkdir(exist_ok=True)
    atomic_torch_save(state, path)
    return path


def f_tiny_state_dict(tmp: Path) -> Path:
    save_file(build_model(TINY_MODEL, 10, 1, 28, TINY_KWARGS).state_dict(), str(tmp / "tiny.safetensors"))
    return tmp / "tiny.safetensors"


BROKEN = {
    "missing file": (f_missing, r"missing\.pth"),
    "a directory": (f_directory, r"adir\.pth"),
    "empty file": (f_empty, r"empty\.pth"),
    "truncated zip (50%)": (f_truncated, r"truncated\.pth"),
    "truncated zip (tail)": (f_truncated_tail, r"tail\.pth"),
    "corrupted pickle": (f_corrupted, r"corrupt\.pth"),
    "text file": (f_text, r"notes\.pth"),
    "pickled list": (f_list, r"list\.pth"),
    "truncated safetensors": (f_truncated_safetensors, r"cut\.safetensors"),
    "safetensors with a broken header": (f_bad_header_safetensors, r"hdr\.safetensors"),
}
LOADERS = {
    "load_checkpoint": lambda p: load_checkpoint(p),
    "load_pretrained": lambda p: load_pretrained(torch.nn.Linear(3, 4), p),
    "load_training_checkpoint": lambda p: load_training_checkpoint(p),
    "timm.create_model(pretrained, file=)": lambda p: timm.create_model(
        "agent_deit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(p)), **TINY_DEIT
    ),
}


def _loader_cases() -> list[Case]:
    cases = []
    for loader, load in LOADERS.items():
        for name, (make, match) in BROKEN.items():
            cases.append(
                Case(loader, name, lambda tmp, load=load, make=make: load(make(tmp)), ValueError, match)
            )
    for name, (make, match) in BROKEN.items():
        if "safetensors" not in name and name != "pickled list":  # torch.save files only; any object loads
            raises = OSError if name in ("missing file", "a directory") else ValueError
            cases.append(
                Case(
                    "safe_torch_load", name, lambda tmp, make=make: safe_torch_load(make(tmp)), raises, match
                )
            )
    cases += [
        Case("load_pretrained", "checkpoint of another architecture (PVT into DeiT)", lambda tmp: load_pretrained(
            timm.create_model("agent_deit_tiny_patch16_224", **TINY_DEIT), f_official("pvt")(tmp)), ValueError,
            r"(?s)official_pvt\.pth does not match AgentDeiT:.*missing.*unexpected"),
        Case("load_pretrained", "same family, other width", lambda tmp: load_pretrained(
            timm.create_model("agent_deit_tiny_patch16_224", **{**TINY_DEIT, "embed_dim": 32}),
            f_official("deit")(tmp)), ValueError, r"mis-shaped"),
        Case("timm.create_model(pretrained, file=)", "checkpoint of another architecture",
             lambda tmp: timm.create_model("agent_deit_tiny_patch16_224", pretrained=True,
                                           pretrained_cfg_overlay=dict(file=str(f_official("pvt")(tmp))), **TINY_DEIT),
             ValueError, r"does not match"),
        Case("load_training_checkpoint", "an official checkpoint, not a training run",
             lambda tmp: load_training_checkpoint(f_official("deit")(tmp)), ValueError, r"not a checkpoint written by"),
        Case("load_checkpoint", "use_ema on a file without EMA", lambda tmp: load_checkpoint(f_text(tmp).with_name(
            "x.pth") if False else _no_ema(tmp), use_ema=True), ValueError, r"no EMA weights"),
    ]  # fmt: skip
    return cases


def _no_ema(tmp: Path) -> Path:
    torch.save({"model": {"w": torch.ones(2)}}, tmp / "noema.pth")
    return tmp / "noema.pth"


# -- CLI ----------------------------------------------------------------------------------------------------------


def cli(entry: str, name: str, argv, match: str, raises=CliFailed, needs_data: bool = False) -> Case:
    """A CLI case; ``argv(tmp)`` builds the arguments (files it needs are made in tmp)."""

    def call(tmp: Path):
        if needs_data and not HAVE_FMNIST:
            pytest.skip("Fashion-MNIST is not installed")
        if entry == B:  # an option that passed validation must not start the (minutes-long) benchmark
            from unittest import mock

            import agentattn.cli.bench_attention as bench

            def refuse(*args, **kwargs):
                raise AssertionError("the benchmark started: the bad option was not caught")

            with mock.patch.object(bench, "environment", refuse):
                return run_cli(argv(tmp) if callable(argv) else argv)
        return run_cli(argv(tmp) if callable(argv) else argv)

    return Case(entry, name, call, raises, match)


def _train(*extra):
    return lambda tmp: ["train", *TINY_CLI, "--output", tmp / "o", "--train-subset", "32", "--batch-size", "16",
                        "--eval-subset", "16", "--max-steps", "1", "--no-progress", *extra]  # fmt: skip


def _resume_from(make):
    def argv(tmp):
        path = make(tmp)
        (tmp / "o").mkdir(exist_ok=True)
        shutil.copy(path, tmp / "o" / "last.pth")
        return _train("--resume")(tmp)

    return argv


def _other_model_run(tmp: Path) -> Path:
    path = f_tiny_run(tmp)
    ckpt = load_training_checkpoint(path)
    ckpt["model_name"] = "agent_deit_tiny_patch16_224"
    atomic_torch_save(ckpt, path)
    return path


T = "agentattn train"
E = "agentattn eval"
F = "agentattn flops"
C = "agentattn convert"
B = "agentattn bench attention"
DEIT = "agent_deit_tiny_patch16_224"

CLI_CASES = [
    cli(T, "unknown model", _train("--model", "agent_pvt_nonexistent"), r"unknown model 'agent_pvt_nonexistent'"),
    cli(T, "model kwarg without =", _train("--model-kwargs", "depths"), r"--model-kwargs 'depths' is not key=value"),
    cli(T, "unknown model kwarg", _train("--model-kwargs", "no_such=3"), r"no_such", needs_data=True),
    cli(T, "out-of-range model kwarg", _train("--model-kwargs", "agent_num=0"), r"agent_num", needs_data=True),
    cli(T, "--epochs 0", _train("--epochs", "0"), r"epochs must be at least 1"),
    cli(T, "--epochs abc", _train("--epochs", "abc"), r"--epochs: invalid int value"),
    cli(T, "--batch-size 0", _train("--batch-size", "0"), r"batch_size must be at least 1"),
    cli(T, "--lr -1", _train("--lr", "-1"), r"lr must be"),
    cli(T, "--lr nan", _train("--lr", "nan"), r"lr must be"),
    cli(T, "--label-smoothing 1.5", _train("--label-smoothing", "1.5"), r"label_smoothing must be in \[0, 1\)"),
    cli(T, "--ema-decay 1", _train("--ema-decay", "1"), r"ema_decay must be in \[0, 1\)"),
    cli(T, "--drop-path 2", _train("--drop-path", "2"), r"drop_path must be in \[0, 1\)"),
    cli(T, "--mixup-prob 2", _train("--mixup-prob", "2"), r"mixup_prob must be in \[0, 1\]"),
    cli(T, "--train-subset 0", _train("--train-subset", "0"), r"train_subset must be a positive int"),
    cli(T, "--img-size 0", _train("--img-size", "0"), r"img_size must be a positive int"),
    cli(T, "--threads -1", _train("--threads", "-1"), r"threads must be >= 0"),
    cli(T, "--amp fp16 on the CPU", _train("--amp", "fp16", "--device", "cpu"), r"amp='fp16' needs a CUDA device"),
    cli(T, "--amp fp8", _train("--amp", "fp8"), r"--amp: invalid choice"),
    cli(T, "--preset bogus", _train("--preset", "bogus"), r"--preset: invalid choice"),
    cli(T, "--device bogus", _train("--device", "bogus"), r"device must be"),
    cli(T, "--device cuda without CUDA", _train("--device", "cuda"), r"CUDA is not available")
    if not torch.cuda.is_available() else cli(T, "--device cuda:99", _train("--device", "cuda:99"), r"cuda"),
    cli(T, "--deterministic with workers", _train("--deterministic", "--num-workers", "2"), r"--deterministic needs"),
    cli(T, "unknown data source", _train("--data", "cifar:x"), r"cifar", needs_data=False),
    cli(T, "missing dataset directory", lambda tmp: [*_train()(tmp), "--data", f"fashion-mnist:{tmp / 'nope'}"],
        r"nope"),
    cli(T, "batch larger than the subset", _train("--batch-size", "64"), r"smaller than one global batch",
        needs_data=True),
    cli(T, "existing run without --resume", lambda tmp: (_resume_from(f_tiny_run)(tmp), _train()(tmp))[1],
        r"last\.pth exists: set resume"),
    cli(T, "--resume from a truncated last.pth", _resume_from(f_truncated), r"last\.pth", needs_data=True),
    cli(T, "--resume from a text file", _resume_from(f_text), r"last\.pth", needs_data=True),
    cli(T, "--resume from an official checkpoint", _resume_from(f_official("deit")), r"not a checkpoint written by",
        needs_data=True),
    cli(T, "--resume from another model's run", _resume_from(_other_model_run), r"is a 'agent_deit_tiny_patch16_224' "
        r"checkpoint, not 'agent_pvt_tiny_224'", needs_data=True),
    # eval
    cli(E, "missing checkpoint", lambda tmp: ["eval", "--checkpoint", f_missing(tmp)], r"missing\.pth: no such"),
    cli(E, "a directory", lambda tmp: ["eval", "--checkpoint", f_directory(tmp)], r"adir\.pth"),
    cli(E, "truncated checkpoint", lambda tmp: ["eval", "--checkpoint", f_truncated(tmp)], r"truncated\.pth"),
    cli(E, "corrupted checkpoint", lambda tmp: ["eval", "--checkpoint", f_corrupted(tmp)], r"corrupt\.pth"),
    cli(E, "truncated safetensors", lambda tmp: ["eval", "--checkpoint", f_truncated_safetensors(tmp), "--model",
                                                 TINY_MODEL], r"cut\.safetensors"),
    cli(E, "bare state dict without --model", lambda tmp: ["eval", "--checkpoint", f_tiny_state_dict(tmp)],
        r"does not record its model: pass --model"),
    cli(E, "run checkpoint with another --model", lambda tmp: ["eval", "--checkpoint", f_tiny_run(tmp), "--model",
                                                               DEIT], r"drop --model"),
    cli(E, "state dict of another architecture", lambda tmp: ["eval", "--checkpoint", f_official("deit")(tmp),
                                                              "--model", TINY_MODEL, "--subset", "8"],
        r"official_deit\.pth", needs_data=True),
    cli(E, "--ema on a run without EMA", lambda tmp: ["eval", "--checkpoint", f_tiny_run(tmp), "--ema"], r"EMA"),
    cli(E, "unknown --model", lambda tmp: ["eval", "--checkpoint", f_tiny_state_dict(tmp), "--model", "nope_net"],
        r"nope_net", needs_data=True),
    cli(E, "--batch-size 0", lambda tmp: ["eval", "--checkpoint", f_tiny_run(tmp), "--batch-size", "0",
                                          "--subset", "8"], r"batch.size", needs_data=True),
    cli(E, "--split bogus", lambda tmp: ["eval", "--checkpoint", f_tiny_run(tmp), "--split", "bogus"], r"bogus",
        needs_data=True),
    cli(E, "--amp fp16", lambda tmp: ["eval", "--checkpoint", f_tiny_run(tmp), "--amp", "fp16"], r"--amp"),
    cli(E, "--device bogus", lambda tmp: ["eval", "--checkpoint", f_tiny_run(tmp), "--device", "bogus", "--subset",
                                          "8"], r"--device", needs_data=True),
    cli(E, "no --checkpoint", ["eval"], r"--checkpoint"),
    # flops
    cli(F, "unknown model", ["flops", "agent_nonexistent"], r"unknown model 'agent_nonexistent'"),
    cli(F, "no model", ["flops"], r"names|arguments"),
    cli(F, "--img-size 0", ["flops", DEIT, "--img-size", "0"], r"--img-size must be a positive"),
    cli(F, "--img-size abc", ["flops", DEIT, "--img-size", "abc"], r"--img-size: invalid int"),
    cli(F, "--json into a missing directory", lambda tmp: ["flops", DEIT, "--img-size", "32", "--json",
                                                           tmp / "no" / "dir" / "f.json"], r"f\.json"),
    # convert
    cli(C, "missing input", lambda tmp: ["convert", f_missing(tmp), tmp / "o.safetensors"], r"missing\.pth"),
    cli(C, "truncated input", lambda tmp: ["convert", f_truncated(tmp), tmp / "o.safetensors"], r"truncated\.pth"),
    cli(C, "corrupted input", lambda tmp: ["convert", f_corrupted(tmp), tmp / "o.safetensors"], r"corrupt\.pth"),
    cli(C, "input is a directory", lambda tmp: ["convert", f_directory(tmp), tmp / "o.safetensors"], r"adir\.pth"),
    cli(C, "output = input", lambda tmp: ["convert", f_official("deit")(tmp), tmp / "official_deit.pth"],
        r"overwrite the input"),
    cli(C, "output not .safetensors", lambda tmp: ["convert", f_official("deit")(tmp), tmp / "o.pth"],
        r"should end in \.safetensors"),
    cli(C, "output directory missing", lambda tmp: ["convert", f_official("deit")(tmp), tmp / "no" / "o.safetensors"],
        r"o\.safetensors"),
    cli(C, "--ema without EMA weights", lambda tmp: ["convert", _no_ema(tmp), tmp / "o.safetensors", "--ema"],
        r"no EMA weights"),
    cli(C, "no output", ["convert", "x.pth"], r"output"),
    # bench attention
    cli(B, "--tokens 6 (not 1 + side²)", ["bench", "attention", "--tokens", "6", "--budget", "0.01"], r"--tokens"),
    cli(B, "--tokens 0", ["bench", "attention", "--tokens", "0", "--budget", "0.01"], r"--tokens"),
    cli(B, "--threads 0", ["bench", "attention", "--tokens", "17", "--threads", "0", "--budget", "0.01"], r"--threads"),
    cli(B, "--dim 10 --heads 3", ["bench", "attention", "--tokens", "17", "--dim", "10", "--heads", "3", "--budget",
                                  "0.01"], r"--dim|divisible"),
    cli(B, "--agents 0", ["bench", "attention", "--tokens", "17", "--agents", "0", "--budget", "0.01"], r"--agents"),
    cli(B, "--budget -1", ["bench", "attention", "--tokens", "17", "--budget", "-1"], r"--budget"),
    cli(B, "unknown benchmark", ["bench", "nothing"], r"invalid choice"),
    cli("agentattn", "unknown command", ["frobnicate"], r"invalid choice"),
]  # fmt: skip


@pytest.mark.parametrize("case", _loader_cases(), ids=case_id)
def test_loader_bad_input(case, tmp_path):
    check_case(case, tmp_path)


@pytest.mark.parametrize("case", CLI_CASES, ids=case_id)
def test_cli_bad_input(case, tmp_path):
    check_case(case, tmp_path)
