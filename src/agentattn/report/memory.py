"""Peak memory of one training step or one inference batch, measured in a fresh process.

The figure is the growth of the process's peak resident set across the step (:mod:`agentattn.measure.memory`):
the model and the input batch are built first and count in the baseline; activations, gradients and optimizer
state count in the figure. A fresh process per measurement keeps one model's memory out of another's.

    python -m agentattn.report.memory '{"model": ..., "model_kwargs": ..., "mode": "train", ...}'
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from ..measure.memory import peak_kib, reset_peak_kib

__all__ = ["step_peak_memory_mib"]


def step_peak_memory_mib(
    model: str,
    model_kwargs: dict[str, Any],
    *,
    num_classes: int,
    in_chans: int,
    img_size: int,
    batch_size: int,
    mode: str,
    threads: int,
) -> float:
    """Peak extra resident memory (MiB) of one ``mode`` step ("train": forward, backward and an AdamW step;
    "infer": a forward under ``torch.inference_mode``) at ``batch_size``, in a child process.

    Raises:
        RuntimeError: the child failed.
    """
    if mode not in ("train", "infer"):
        raise ValueError(f"mode must be 'train' or 'infer', got {mode!r}")
    spec = dict(
        model=model, model_kwargs=model_kwargs, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
        batch_size=batch_size, mode=mode, threads=threads,
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "agentattn.report.memory", json.dumps(spec)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"measuring the {mode} memory of {model} failed: {last}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"])


def _child(spec: dict[str, Any]) -> float:
    import torch

    from ..train.loop import build_model

    torch.manual_seed(0)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["model_kwargs"].items()}
    model = build_model(spec["model"], spec["num_classes"], spec["in_chans"], spec["img_size"], kwargs)
    size = (spec["batch_size"], spec["in_chans"], spec["img_size"], spec["img_size"])
    images, targets = torch.randn(size), torch.randint(0, spec["num_classes"], (spec["batch_size"],))
    if spec["mode"] == "train":
        optimizer = torch.optim.AdamW(model.parameters())
        base = reset_peak_kib()
        loss = torch.nn.functional.cross_entropy(model.train()(images), targets)
        loss.backward()
        optimizer.step()
    else:
        model.eval()
        base = reset_peak_kib()
        with torch.inference_mode():
            model(images)
    return (peak_kib() - base) / 1024.0


if __name__ == "__main__":
    print(json.dumps({"peak_mib": _child(json.loads(sys.argv[1]))}))
