"""No loader runs pickled code: every loader × payload × file layout refuses a malicious pickle, and the payload's
marker file is never created. A control first shows that a plain ``torch.load(weights_only=False)`` of the
same file does run it.

New loaders (LM checkpoints, deploy bundles, ...) join by adding a row to LOADERS, or by reusing
``tests.hardening.malicious.make_malicious_pickle`` in their own tests.
"""

from __future__ import annotations

import shutil

import pytest
import timm
import torch
from torch import nn

from agentattn.io import load_checkpoint, safe_torch_load
from agentattn.models.pretrained import load_pretrained
from agentattn.train import load_training_checkpoint
from agentattn.train.data import FASHION_MNIST_DIR

from . import figures
from .cases import CliFailed, run_cli
from .malicious import LAYOUTS, PAYLOADS, make_malicious_pickle, naive_load_runs_it

TINY_DEIT = dict(depth=1, img_size=32, patch_size=8, embed_dim=16, num_heads=2, agent_num=4, num_classes=4)


def _train_resume(path, tmp):
    out = tmp / "run"
    out.mkdir()
    shutil.copy(path, out / "last.pth")
    run_cli(["train", "--output", out, "--resume", "--train-subset", "32", "--batch-size", "16",
             "--eval-subset", "16", "--no-progress", "--max-steps", "1"])  # fmt: skip


# name -> (load(path, tmp), layouts it is tried on). Cheap loaders get every layout; the CLI ones the layouts
# they would actually meet.
LOADERS = {
    "safe_torch_load": (lambda p, tmp: safe_torch_load(p), LAYOUTS),
    "load_checkpoint": (lambda p, tmp: load_checkpoint(p), LAYOUTS),
    "load_checkpoint(use_ema=True)": (
        lambda p, tmp: load_checkpoint(p, use_ema=True),
        ("official", "legacy"),
    ),
    "load_pretrained": (lambda p, tmp: load_pretrained(nn.Linear(3, 4), p), LAYOUTS),
    "timm.create_model(pretrained, file=)": (
        lambda p, tmp: timm.create_model(
            "agent_deit_tiny_patch16_224",
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(p)),
            **TINY_DEIT,
        ),
        ("official", "state_dict", "legacy"),
    ),
    "AgentDeiT.load_pretrained": (
        lambda p, tmp: timm.create_model("agent_deit_tiny_patch16_224", **TINY_DEIT).load_pretrained(str(p)),
        ("official", "state_dict"),
    ),
    "load_training_checkpoint": (lambda p, tmp: load_training_checkpoint(p), LAYOUTS),
    "agentattn eval": (
        lambda p, tmp: run_cli(["eval", "--checkpoint", p, "--model", "agent_pvt_tiny_224"]),
        ("training", "official", "state_dict"),
    ),
    "agentattn convert": (
        lambda p, tmp: run_cli(["convert", p, tmp / "out.safetensors"]),
        ("official", "legacy"),
    ),
    "agentattn train --resume": (_train_resume, ("training",)),
}

CASES = [
    (loader, layout, payload)
    for loader, (_, layouts) in LOADERS.items()
    for layout in layouts
    for payload in (PAYLOADS if loader != "agentattn train --resume" else ("system", "exec"))
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("payload", PAYLOADS)
def test_control_plain_torch_load_runs_the_payload(tmp_path, payload, layout):
    marker = tmp_path / "PWNED"
    path = make_malicious_pickle(tmp_path / "evil.pth", marker, payload, layout)
    assert naive_load_runs_it(path, marker), (
        "the malicious file is not malicious: the tests would prove nothing"
    )


@pytest.mark.parametrize("loader,layout,payload", CASES, ids=["|".join(c) for c in CASES])
def test_loader_never_runs_pickled_code(tmp_path, loader, layout, payload):
    if (
        loader == "agentattn train --resume"
        and not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()
    ):
        pytest.skip("Fashion-MNIST is not installed")
    marker = tmp_path / "PWNED"
    path = make_malicious_pickle(tmp_path / "evil.pth", marker, payload, layout)
    counts = figures.MALICIOUS[loader]
    counts[0] += 1
    load, _ = LOADERS[loader]
    with pytest.raises((ValueError, CliFailed)) as info:
        load(path, tmp_path)
    assert not marker.exists(), f"{loader} ran the pickled {payload} payload"
    if isinstance(info.value, CliFailed):
        assert info.value.well_formed and ("evil.pth" in info.value.stderr or "last.pth" in info.value.stderr)
    else:
        assert "evil.pth" in str(info.value) or (
            loader == "load_training_checkpoint" and layout == "raw_pickle"
        )
    counts[1] += 1


def test_safetensors_files_hold_no_code(tmp_path):
    """safetensors is data only: a file with a pickle payload appended after the tensors is refused or ignored."""
    from agentattn.io import save_safetensors

    good = tmp_path / "w.safetensors"
    save_safetensors({"w": torch.ones(2)}, good)
    marker = tmp_path / "PWNED"
    evil = make_malicious_pickle(tmp_path / "evil.pth", marker, "system", "root")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes() + evil.read_bytes())
    figures.MALICIOUS["load_checkpoint(.safetensors)"][0] += 1
    with pytest.raises(ValueError, match=r"bad\.safetensors"):
        load_checkpoint(bad)
    assert not marker.exists()
    figures.MALICIOUS["load_checkpoint(.safetensors)"][1] += 1
