"""`agentattn lm train` under torchrun: two processes (gloo on CPU) train one model; rank 0 alone writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from agentattn.lm import AgentLM

TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--num-agents", "4", "--chunk-size", "8",
        "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-every", "3", "--eval-batches", "1",
        "--no-progress", "--threads", "1", "--device", "cpu"]  # fmt: skip


@pytest.mark.parametrize("attn", ["agent"])
def test_two_process_gloo_run(attn, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 60)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "agentattn", "lm", "train", "--attn", attn, *TINY, "--data", f"textfile:{text}",
           "--output", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("val bpb") == 1  # rank 0 alone prints
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["tokens"] == 3 * 2 * 2 * 32  # steps × batch × ranks × context
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and "val_bpb" in rows[-1]
    model = AgentLM.load(out / "model.safetensors")
    assert torch.isfinite(next(model.parameters())).all()
