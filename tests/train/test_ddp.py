"""Two processes under torchrun (gloo on CPU): DDP keeps the weights identical on both ranks."""

from __future__ import annotations

import json
import subprocess

import torch

from agentattn.train import load_training_checkpoint

from . import PYTHON, TINY_KWARGS, TINY_MODEL, needs_fashion_mnist, subprocess_env

pytestmark = needs_fashion_mnist

# Each rank trains through the library entry point and saves its own copy of the weights.
SCRIPT = """
import json, os, sys, torch
from agentattn.train import TrainConfig, train
config = TrainConfig(**json.loads(sys.argv[1]))
result = train(config)
torch.save(result.model.state_dict(), os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
"""


def test_two_process_gloo_run_keeps_ranks_identical(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    config = dict(
        model=TINY_MODEL, model_kwargs=TINY_KWARGS, output=str(out), epochs=1, batch_size=16,
        train_subset=320, eval_subset=100, lr=2e-3, mixup=0.8, cutmix=1.0, ema_decay=0.9,
        deterministic=True, threads=1, progress=False, device="cpu",
    )  # fmt: skip
    cmd = [
        PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(script), json.dumps(config), str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=55)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0.keys() == r1.keys()
    for key in r0:
        assert torch.equal(r0[key], r1[key]), f"{key} differs across ranks"
    # Rank 0 alone logged and checkpointed: 320 images / (2 ranks × 16) = 10 steps, each logged once.
    ckpt = load_training_checkpoint(out / "last.pth")
    assert ckpt["global_step"] == 10
    assert all(torch.equal(ckpt["model"][k], r0[k]) for k in r0)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in lines if r["kind"] == "step"] == list(range(1, 11))
    assert proc.stdout.count("epoch 1/1:") == 1
