"""Training tests: a tiny Agent-PVT (4 stages of depth 1, ~90k params) on a few hundred Fashion-MNIST images."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from agentattn.train.data import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = "agent_pvt_tiny_224"
TINY_KWARGS = dict(
    depths=(1, 1, 1, 1),
    embed_dims=(16, 32, 48, 64),
    num_heads=(1, 1, 2, 2),
    mlp_ratios=(2, 2, 2, 2),
    agent_num=(4, 4, 4, 1),
    drop_path_rate=0.1,
)
# The same kwargs as command-line arguments.
TINY_CLI = [
    "--model",
    TINY_MODEL,
    "--model-kwargs",
    *(f"{k}={v!r}".replace(" ", "") for k, v in TINY_KWARGS.items()),
]

needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)


def subprocess_env() -> dict[str, str]:
    """Environment for child Python processes: the package importable, one thread each (2-core machines)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


PYTHON = sys.executable
