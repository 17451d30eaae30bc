"""SIGKILL a training process after its first checkpoint, resume it, and get the uninterrupted run bit for bit."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time

import torch

from agentattn.train import load_training_checkpoint

from . import PYTHON, TINY_CLI, needs_fashion_mnist, subprocess_env

pytestmark = needs_fashion_mnist

STEPS = 2 * (480 // 16)
TIMING = {"time_s", "img_per_s", "epoch_time_s"}  # wall-clock fields: the only ones allowed to differ


def _command(out) -> list[str]:
    # Mixup/CutMix (numpy RNG), drop path (torch RNG), EMA, clipping and warmup all take part.
    return [
        PYTHON, "-m", "agentattn.cli.train", *TINY_CLI, "--output", str(out), "--epochs", "2",
        "--batch-size", "16", "--train-subset", "480", "--eval-subset", "100", "--seed", "3",
        "--deterministic", "--ckpt-every-steps", "4", "--ema-decay", "0.9", "--mixup", "0.8",
        "--cutmix", "1.0", "--clip-grad", "1.0", "--warmup-epochs", "0.5", "--lr", "2e-3", "--no-progress",
    ]  # fmt: skip


def _metrics(out) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}  # noqa: E731
    return [strip(r) for r in lines], [strip(r) for r in rows]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    env = subprocess_env()
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    proc = subprocess.Popen(_command(killed), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 50
    while not (killed / "last.pth").exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 50 s"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    at_kill = load_training_checkpoint(killed / "last.pth")
    assert 0 < at_kill["global_step"] < STEPS, "the run finished before the kill: nothing was tested"

    resumed = subprocess.run([*_command(killed), "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {killed / 'last.pth'}" in resumed.stdout
    reference = subprocess.run(_command(straight), env=env, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr

    a, b = load_training_checkpoint(killed / "last.pth"), load_training_checkpoint(straight / "last.pth")
    assert a["global_step"] == b["global_step"] == STEPS
    for part in ("model", "state_dict_ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after the resume"
    for key, value in b["optimizer"]["state"].items():
        assert torch.equal(a["optimizer"]["state"][key]["exp_avg_sq"], value["exp_avg_sq"])
    jsonl_a, csv_a = _metrics(killed)
    jsonl_b, csv_b = _metrics(straight)
    assert len([r for r in jsonl_a if r["kind"] == "step"]) == STEPS  # no step logged twice
    assert jsonl_a == jsonl_b
    assert csv_a == csv_b and len(csv_a) == 2
