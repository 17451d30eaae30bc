"""Run by `make wheel-check` inside a clean venv that holds only the built wheel of agentattn.

Fails if the import resolves to the source tree, or if any module is missing from the wheel.
"""

import importlib
import pkgutil
import sys
from pathlib import Path

import torch

import agentattn

where = Path(agentattn.__file__).resolve()
assert Path(sys.prefix).resolve() in where.parents, (
    f"agentattn imported from {where}, not from the wheel's venv"
)
for module in pkgutil.walk_packages(agentattn.__path__, "agentattn."):
    if module.name != "agentattn.__main__":
        importlib.import_module(module.name)
assert (where.parent / "py.typed").exists(), "py.typed missing from the wheel"
import _agentattn_cli  # noqa: E402  (the console script's launcher, a top-level module of the wheel)

assert Path(sys.prefix).resolve() in Path(_agentattn_cli.__file__).resolve().parents, (
    "launcher not in the wheel"
)

from agentattn.layers import AgentAttention  # noqa: E402

layer = AgentAttention(32, num_heads=2, agent_num=9, grid_size=(4, 4), num_prefix_tokens=1)
assert layer(torch.randn(2, 17, 32)).shape == (2, 17, 32)
print(f"wheel OK: agentattn {agentattn.__version__} from {where.parent}")
